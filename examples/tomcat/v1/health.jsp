<%@ page contentType="text/plain; charset=UTF-8" trimDirectiveWhitespaces="true" %>
UP
