<%@ page contentType="text/plain; charset=UTF-8" trimDirectiveWhitespaces="true" %>
<% String p = request.getParameter("ms"); long ms = p == null ? 1000 : Long.parseLong(p); Thread.sleep(ms); %>
v1 slow <%= ms %>
