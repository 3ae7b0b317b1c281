-- luacheck for supervisor/lua/ (tests/test_lua.py runs it): the code runs inside nginx's lua module.
std = "ngx_lua"
max_line_length = 120
