-- bluegreen's program inside nginx: the runtime switch (NGINX-NOTES.md has the tested pattern).
--
-- One copy serves every app in an nginx: each app's rendered part calls these functions with its
-- own settings (`app`: its name, its two shared dicts, its route file, the variables a preview
-- request and a rollout user are read from, the paths a watch never judges). nginx loads it in
-- the master (init_by_lua), so that workers running as another user never read the file.
--
-- A request is counted in once, by the balancer, in the app's table dict: "inflight:PORT:WORKER",
-- and a long-lived one (a WebSocket, an event stream, a listed path: the app's bind variable,
-- from the maps of its part, names another address than 127.0.0.1) also in "long:PORT:WORKER".
-- What was counted rides in the request variable $bluegreen_request, "port gen app judged long
-- id cookie", which survives internal redirects (error_page, X-Accel-Redirect, try_files),
-- unlike ngx.ctx; the http-level log handler counts it out, and counts the answer for the watch.
--
-- Holding (app.hold set: an HTTP app behind the runtime switch). Every request may be tried once
-- more (balancer.set_more_tries). When its app refused the connection (nothing listens: it
-- crashed), the retry goes to the app's hold server, a loopback port of this same nginx, whose
-- access handler (M.hold) waits, the request's body buffered, until the table names a port that
-- is not known to be down, then proxies it there (the balancer picks afresh); past the hold
-- timeout it answers 503 with Retry-After. A request the app may have read (bytes were sent) is
-- retried so only if its method is idempotent and app.retry_idempotent; otherwise the retry goes
-- to a fail address that answers what nginx would have (502, or 504 for a timeout) and is counted
-- lost. A paused table (`pause`), or a port marked down (by the daemon: a hung app; by a refused
-- connect), sends new requests to the hold server at once.

local balancer = require("ngx.balancer")

local M = {}

-- A fresh nginx has no port in the table: it takes the one in the route file (written by the
-- daemon before every change). `add` leaves a value set meanwhile alone, and a reload keeps the
-- table. A file nginx cannot read is said in its error log.
function M.seed(table_dict, route_file)
    local dict = ngx.shared[table_dict]
    local f, err = io.open(route_file, "r")
    if f then
        local p = tonumber(f:read("*l") or "")
        f:close()
        if p then dict:add("port", p) end
    else
        ngx.log(ngx.ERR, "bluegreen: cannot read the route file: ", err, " (nginx's user must be able to read it)")
    end
end

local function route_port(app, dict)
    local port = dict:get("port")
    if not port then
        M.seed(app.table, app.route)
        port = dict:get("port")
    end
    return port
end

-- Whether the watch judges this request: not for the app's unjudged paths (a path, or a prefix
-- ending in "/").
local function judged(app)
    local uri = ngx.var.uri or ""
    for _, p in ipairs(app.unjudged) do
        if uri == p or (p:sub(-1) == "/" and uri:sub(1, #p) == p) or uri:sub(1, #p + 1) == p .. "/" then
            return 0
        end
    end
    return 1
end

-- A preview request goes to the preview port; during a split, a user whose bucket (a stable hash
-- of the rollout cookie modulo 100) is below the share goes to the candidate. A user without the
-- cookie gets a random id (many users may share one address: NAT, a load balancer), sent back in
-- the cookie. Returns the port and the new id ("-": none).
local function pick(app, dict, port)
    local preview = dict:get("preview")
    local token = preview and (dict:get("preview_token") or "1")
    if preview and (ngx.var[app.preview_header] == token or ngx.var[app.preview_cookie] == token) then
        return preview, "-"
    end
    local cand = dict:get("cand")
    if not cand then return port, "-" end
    local id = "-"
    local user = ngx.var["cookie_" .. app.rollout_cookie]
    if not user or user == "" then
        user = ngx.md5(ngx.worker.pid() .. " " .. ngx.var.connection .. " " .. ngx.var.connection_requests .. " "
                       .. ngx.now() .. " " .. math.random()):sub(1, 16)
        id = user
    end
    if ngx.crc32_short(user) % 100 < (dict:get("share") or 0) then port = cand end
    return port, id
end

local IDEMPOTENT = {GET = true, HEAD = true, PUT = true, DELETE = true, OPTIONS = true, TRACE = true}

-- The bytes the last attempt sent to its app ($upstream_bytes_sent has one per attempt).
local function last_sent()
    local n = 0
    for v in (ngx.var.upstream_bytes_sent or ""):gmatch("%d+") do n = tonumber(v) end
    return n
end

-- The first attempt's value of an $upstream_* variable (one per attempt, ", " between retries and
-- " : " between internal redirects).
local function first(name)
    return (ngx.var[name] or ""):match("^%s*([^,:%s]+)")
end

-- Counts a request in, on `port`: once, and never a subrequest (auth_request, mirror: nginx runs
-- no log phase for them). Port 0: held, at no app (the hold server counts it in where it goes).
local function count_in(app, dict, port, id)
    if ngx.var.bluegreen_request ~= "" or ngx.is_subrequest then return end
    local long = 0
    if port ~= 0 then
        local worker = port .. ":" .. ngx.worker.pid()
        long = (ngx.var[app.bind] or "127.0.0.1") ~= "127.0.0.1" and 1 or 0
        dict:incr("inflight:" .. worker, 1, 0)
        if long == 1 then dict:incr("long:" .. worker, 1, 0) end
    end
    ngx.var.bluegreen_request = port .. " " .. (dict:get("gen") or 0) .. " " .. app.name .. " "
        .. judged(app) .. " " .. long .. " " .. id .. " " .. app.rollout_cookie
end

-- The request counted in on `port` leaves it for the hold server: counted out there now.
local function count_out_to_hold(dict, port)
    local state = ngx.var.bluegreen_request
    local _, rest = state:match("^(%d+)( .*)$")
    if not rest or port == 0 then return end
    local worker = port .. ":" .. ngx.worker.pid()
    dict:incr("inflight:" .. worker, -1, 0)
    if rest:match("^ %d+ %S+ %d 1") then dict:incr("long:" .. worker, -1, 0) end
    ngx.var.bluegreen_request = "0" .. rest:gsub("^( %d+ %S+ %d) 1", "%1 0")
end

-- "gate": whether anything is paused or down, the one key a normal request reads (set after each
-- change; a stale one costs a request two reads more, never a wrong route).
local function set_gate(dict)
    if dict:get("pause") or dict:get("down") then dict:set("gate", true) else dict:delete("gate") end
end

local function to_peer(addr, port)
    local ok, err = balancer.set_current_peer(addr, port)
    if not ok then
        ngx.log(ngx.ERR, "bluegreen: ", err)
        return ngx.exit(502)
    end
end

-- The app's port did not answer: hold what it never saw, and what it may have seen if that is
-- allowed (idempotent, app.retry_idempotent); send the rest to the fail socket (lost).
local function retry(app, dict, code)
    local port = tonumber((ngx.var.bluegreen_request or ""):match("^(%d+)")) or 0
    local sent = last_sent()
    -- (refused: nothing listens there; reset or closed mid-request: it is dying, or a probe says it is not)
    if code == 502 and port ~= 0 then
        dict:set("down", port)
        set_gate(dict)
    end
    if code == 502 and (sent == 0 or (app.retry_idempotent and IDEMPOTENT[ngx.req.get_method()])) then
        count_out_to_hold(dict, port)
        return to_peer(app.hold, app.hold_port)
    end
    return to_peer(code == 504 and app.fail504 or app.fail502, app.hold_port)
end

-- balancer_by_lua: picks the port once per request (retries and internal redirects keep it) and
-- counts the request in. `held`: the hold server's upstream, which routes a held request afresh
-- and never holds it again. (Only a request counted in already can be a retry: the common path
-- reads one key more than before, "gate", set while anything is paused or down.)
function M.balancer(app, held)
    local dict = ngx.shared[app.table]
    local state = ngx.var.bluegreen_request or ""
    -- (a request held once is held again if the port it was let go to refuses it: the build the
    -- table named died meanwhile; never a third time: the second hold server sees X-Bluegreen-Held)
    local holds = app.hold ~= "" and (not held or (ngx.var.http_x_bluegreen_held or "") == "")
    if state ~= "" and holds then
        local failed, code = balancer.get_last_failure()
        if failed then return retry(app, dict, code) end
    end
    local port
    if state ~= "" then
        local p, name = state:match("^(%d+) %d+ (%S+)")
        if name == app.name and p ~= "0" then port = tonumber(p) end
    end
    if not port then
        local id
        port, id = pick(app, dict, route_port(app, dict))
        if not port then
            ngx.log(ngx.ERR, "bluegreen: no route for ", app.name, " yet (the daemon sets it)")
            return ngx.exit(502)
        end
        if holds and not held and dict:get("gate") and (dict:get("pause") or dict:get("down") == port) then
            count_in(app, dict, 0, id)
            return to_peer(app.hold, app.hold_port)
        end
        count_in(app, dict, port, id)
    end
    if holds then balancer.set_more_tries(1) end
    return to_peer("127.0.0.1", port)
end

-- Whether `port`, marked down, answers again (an app restarted by someone else): one held request
-- per port tries a connection every PROBE seconds, and two in a row must succeed (a dying app's
-- listener may accept for a moment). Never a port the daemon said is down: a hung app accepts.
local PROBE = 0.05
local function back(dict, port)
    if dict:get("down_said") or not dict:add("probe:" .. port, true, PROBE) then return false end
    local sock = ngx.socket.tcp()
    sock:settimeout(100)
    local ok = sock:connect("127.0.0.1", port)
    sock:close()
    if not ok then
        dict:delete("up:" .. port)
        return false
    end
    if not dict:add("up:" .. port, true, 10) then  -- the second in a row
        dict:delete("up:" .. port)
        if dict:get("down") == port then
            dict:delete("down")
            set_gate(dict)
        end
        return true
    end
    return false
end

-- A held request told to come back later: 503 with Retry-After. Counted: turned away at once
-- (`start` nil: hold.max_requests were held already), or timed out, its wait counted with the others'.
local function give_up(app, dict, start)
    dict:incr("holding", -1, 0)
    if start then
        local ms = math.floor((ngx.now() - start) * 1000 + 0.5)
        dict:incr("hold_timeouts", 1, 0)
        dict:incr("held_ms", ms, 0)
        if ms > (dict:get("held_longest") or 0) then dict:set("held_longest", ms) end
    else
        dict:incr("hold_full", 1, 0)
    end
    ngx.header["Retry-After"] = app.retry_after
    return ngx.exit(503)
end

-- access_by_lua of the hold server (and its fail addresses, which answer as nginx would have). A
-- held request waits while the table is paused or names a port known to be down, then goes on
-- to the balancer; past the hold timeout (the pause's own, if it set one) it gets 503 and
-- Retry-After. Counted: held now, held in all (with the balancer's), seconds held, timeouts.
function M.hold(app)
    local addr = ngx.var.server_addr
    if addr == app.fail502 then return ngx.exit(502) end
    if addr == app.fail504 then return ngx.exit(504) end
    local dict = ngx.shared[app.table]
    local start, nap = ngx.now(), 0.002
    if dict:incr("holding", 1, 0) > app.hold_max then  -- full: each held request takes three connections
        return give_up(app, dict, nil)
    end
    dict:incr("held", 1, 0)  -- (counted here: what the daemon hands over from a dead app's queue comes in too)
    while true do
        local pause = dict:get("pause")
        local port = route_port(app, dict)
        if not pause and port and (dict:get("down") ~= port or back(dict, port)) then break end
        if ngx.now() - start >= (pause or app.hold_timeout) then
            return give_up(app, dict, start)
        end
        ngx.sleep(nap)  -- 2 ms, doubling up to 20: a spare is taken at once, a boot costs no CPU
        nap = math.min(nap * 2, 0.02)
    end
    local ms = math.floor((ngx.now() - start) * 1000 + 0.5)
    dict:incr("holding", -1, 0)
    dict:incr("held_ms", ms, 0)
    if ms > (dict:get("held_longest") or 0) then dict:set("held_longest", ms) end
end

-- Counts one answer of a watch generation `gen` ("0": since nginx started, for the metrics):
-- requests, 5xx answers, upstream errors (no answer header from the app: refused, reset, timed
-- out), and for a watch generation its latency bucket (verdict.py computes the same index).
local function count_answer(stats, gen, port, status)
    local header = (ngx.var.upstream_header_time or "-"):match("([^,%s]+)%s*$")
    local kind = nil
    if not header or header == "-" then
        kind = "err"
    elseif status >= 500 then
        kind = "5xx"
    end
    local total = "s:0:" .. port .. ":"
    stats:incr(total .. "n", 1, 0)
    if kind then stats:incr(total .. kind, 1, 0) end
    if gen ~= "0" then
        local p = "s:" .. gen .. ":" .. port .. ":"
        stats:incr(p .. "n", 1, 0)
        if kind then stats:incr(p .. kind, 1, 0) end
        local t = tonumber((ngx.var.upstream_response_time or ""):match("([%d.]+)%s*$") or "")
        if t then stats:incr(p .. "l" .. math.floor(math.log(t * 10000 + 1) / math.log(1.2)), 1, 0) end
    end
end

-- log_by_lua (http level, every request, failed ones too): counts the request out of the app
-- whose balancer took it. A client that hung up first (499) says nothing about the app: not
-- judged, nor are the app's unjudged paths.
function M.log()
    local state = ngx.var.bluegreen_request
    if not state or state == "" then
        local probe = ngx.ctx.bluegreen_probe  -- a control request asking whether these handlers run
        if probe then ngx.shared[probe]:incr("handlers", 1, 0) end
        return
    end
    local port, gen, app, is_judged, long = state:match("^(%d+) (%d+) (%S+) (%d) (%d)")
    if not port then return end
    local dict = ngx.shared["bluegreen." .. app]
    if not dict then return end
    local status = tonumber(ngx.var.status) or 0
    if (status == 502 or status == 504) and first("upstream_header_time") == "-"
            and (tonumber(first("upstream_bytes_sent")) or 0) > 0 then
        dict:incr("lost", 1, 0)  -- sent to an app that failed (or hung) before answering: it may have seen it
    end
    if port == "0" then return end  -- held: the hold server's request counts what it got
    local worker = port .. ":" .. ngx.worker.pid()
    dict:incr("inflight:" .. worker, -1, 0)
    if long == "1" then dict:incr("long:" .. worker, -1, 0) end
    if is_judged ~= "1" or status == 499 then return end
    count_answer(ngx.shared["bluegreen." .. app .. ".stats"], gen, port, status)
end

-- header_filter_by_lua (http level): a user met for the first time during a split keeps the bucket
-- it was given: its new id goes back in the rollout cookie, next to any cookie the app sets.
function M.header_filter()
    local id, name = (ngx.var.bluegreen_request or ""):match(" (%x+) (%S+)$")
    if not id then return end
    local cookie = name .. "=" .. id .. "; Path=/; Max-Age=2592000; HttpOnly; SameSite=Lax"
    local h = ngx.header["Set-Cookie"]
    if h == nil then
        ngx.header["Set-Cookie"] = cookie
    elseif type(h) == "table" then
        table.insert(h, cookie)
        ngx.header["Set-Cookie"] = h
    else
        ngx.header["Set-Cookie"] = {h, cookie}
    end
end

-- The control socket's locations (/.bluegreen/NAME on a Unix socket only the daemon reaches).

local function bad(text)
    ngx.status = 400
    ngx.say(text)
end

-- The captures of `pattern` in the request's body (nothing when it does not match).
local function body(pattern)
    ngx.req.read_body()
    return (ngx.req.get_body_data() or ""):match(pattern)
end

local function forget(dict, ...)
    for _, key in ipairs({...}) do dict:delete(key) end
end

-- The keys of `dict` that start with `prefix`, each without it.
local function keys_after(dict, prefix)
    local found = {}
    for _, key in ipairs(dict:get_keys(0)) do
        if key:sub(1, #prefix) == prefix then found[#found + 1] = key:sub(#prefix + 1) end
    end
    return found
end

-- The number in query argument `name`; nil, after a 400 answer, if there is none.
local function number_arg(name)
    local n = tonumber(ngx.var["arg_" .. name] or "")
    if not n then bad("expected ?" .. name .. "=N") end
    return n
end

local control = {}

-- PUT a port (digits, 1-65535) or GET: answers the table's value. A new route ends any preview
-- and split (their ports may be about to stop).
function control.route(app)
    local dict = ngx.shared[app.table]
    if ngx.req.get_method() == "PUT" then
        local port = tonumber(body("^%s*(%d+)%s*$") or "")
        if not port or port < 1 or port > 65535 then return bad("expected a port number (1-65535)") end
        dict:set("port", port)
        forget(dict, "preview", "preview_token", "cand", "share", "down", "down_said")
        set_gate(dict)
    end
    ngx.say(route_port(app, dict) or "")
end

-- PUT "port" or "port token": preview requests (their header or cookie equal to the token, or to
-- 1 without one) go there; DELETE: no preview. Answers "port token" as set (or "").
function control.preview(app)
    local dict = ngx.shared[app.table]
    local method = ngx.req.get_method()
    if method == "PUT" then
        local p, token = body("^%s*(%d+)%s*([%w_-]*)%s*$")
        local port = tonumber(p or "")
        if not port or port < 1 or port > 65535 or #token > 64 then
            return bad("expected a port number (1-65535), then an optional token (letters, digits, _ and -)")
        end
        dict:set("preview", port)
        if token ~= "" then dict:set("preview_token", token) else dict:delete("preview_token") end
    elseif method == "DELETE" then
        forget(dict, "preview", "preview_token")
    end
    local token = dict:get("preview_token")
    ngx.say((dict:get("preview") or "") .. (token and (" " .. token) or ""))
end

-- PUT "candidate share gen" (candidate 0: none, only the watch generation), GET, DELETE (all off,
-- and the watch counters with it; generation 0 stays). Answers the three numbers (0: unset).
function control.split(app)
    local dict = ngx.shared[app.table]
    local method = ngx.req.get_method()
    if method == "PUT" then
        local c, s, g = body("^%s*(%d+)%s+(%d+)%s+(%d+)%s*$")
        c, s, g = tonumber(c or ""), tonumber(s or ""), tonumber(g or "")
        if not c or c > 65535 or s > 100 or g < 1 then
            return bad("expected: candidate-port share(0-100) generation(>0)")
        end
        if c > 0 then
            dict:set("cand", c)
            dict:set("share", s)
        else
            forget(dict, "cand", "share")
        end
        dict:set("gen", g)
    elseif method == "DELETE" then
        forget(dict, "cand", "share", "gen")
        local stats = ngx.shared[app.stats]
        for _, k in ipairs(stats:get_keys(0)) do
            if k:sub(1, 4) ~= "s:0:" then stats:delete(k) end
        end
    end
    ngx.say((dict:get("cand") or 0) .. " " .. (dict:get("share") or 0) .. " " .. (dict:get("gen") or 0))
end

-- GET ?gen=G: one "port kind count" line per counter of watch generation G (0: all since nginx started).
function control.stats(app)
    local gen = number_arg("gen")
    if not gen then return end
    local stats, prefix = ngx.shared[app.stats], "s:" .. gen .. ":"
    for _, rest in ipairs(keys_after(stats, prefix)) do
        local port, kind = rest:match("^(%d+):(%w+)$")
        if port then ngx.say(port, " ", kind, " ", stats:get(prefix .. rest) or 0) end
    end
end

-- GET ?port=P: one "worker-pid count long" line per worker that ever sent a request to P: its
-- requests in flight there, and how many of them are long-lived.
function control.inflight(app)
    local port = number_arg("port")
    if not port then return end
    local dict, prefix = ngx.shared[app.table], "inflight:" .. port .. ":"
    for _, worker in ipairs(keys_after(dict, prefix)) do
        ngx.say(worker, " ", dict:get(prefix .. worker) or 0, " ", dict:get("long:" .. port .. ":" .. worker) or 0)
    end
end

-- GET: how many control requests the http-level log handler has counted; each GET is counted
-- once it has ended, so the next answer is higher exactly when nginx runs the handlers.
function control.handlers(app)
    ngx.ctx.bluegreen_probe = app.table
    ngx.say(ngx.shared[app.table]:get("handlers") or 0)
end

-- GET: the whole routing state, "port preview candidate share gen" (0 for unset): what the daemon
-- compares with what it set, to find an nginx restarted behind its back (a restart empties the
-- table; the route file brings the port back, nothing else).
function control.state(app)
    local dict = ngx.shared[app.table]
    local port = route_port(app, dict)
    ngx.say((port or 0) .. " " .. (dict:get("preview") or 0) .. " " .. (dict:get("cand") or 0)
            .. " " .. (dict:get("share") or 0) .. " " .. (dict:get("gen") or 0))
end

-- PUT "pause SECONDS" (hold every new request, each up to SECONDS), "resume", "down PORT" (a port
-- that cannot answer: new requests to it are held), "up" (none is down); GET: answers
-- "held holding hold_timeouts held_ms held_longest lost pause down hold_full" (counters since nginx
-- started; pause: its timeout, 0 if none).
local HOLD_KEYS = {"held", "holding", "hold_timeouts", "held_ms", "held_longest", "lost", "pause", "down", "hold_full"}
function control.hold(app)
    local dict = ngx.shared[app.table]
    if ngx.req.get_method() == "PUT" then
        local what, n = body("^%s*(%a+)%s*(%d*%.?%d*)%s*$")
        n = tonumber(n or "")
        if what == "pause" and n and n > 0 then
            dict:set("pause", n)
        elseif what == "resume" then
            dict:delete("pause")
        elseif what == "down" and n and n >= 1 and n <= 65535 then
            dict:set("down", n)
            dict:set("down_said", true)  -- until a route elsewhere, or "up": no probe says otherwise
            dict:set("held_longest", 0)  -- an outage begins: its own longest wait
        elseif what == "up" then
            forget(dict, "down", "down_said")
        else
            return bad("expected: pause SECONDS, resume, down PORT or up")
        end
        set_gate(dict)
    end
    local values = {}
    for i, key in ipairs(HOLD_KEYS) do values[i] = dict:get(key) or 0 end
    ngx.say(table.concat(values, " "))
end

-- content_by_lua of /.bluegreen/WHAT.
function M.control(app, what)
    return control[what](app)
end

return M
