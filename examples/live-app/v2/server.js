// A Node service with long-lived connections, that knows nothing about bluegreen: it reads PORT,
// answers /health and /slow?ms=N, streams numbered server-sent events on /events and numbered WebSocket messages
// on /ws (the `ws` package, installed in ../node_modules), and on SIGTERM stops accepting and
// exits once its connections have ended, as most apps do: it never ends a stream by itself.
'use strict';
const http = require('http');
const fs = require('fs');
const path = require('path');
const { WebSocketServer } = require('ws');

const port = Number(process.env.PORT);
if (!port) {
  console.error('PORT is not set');
  process.exit(2);
}
const pkg = JSON.parse(fs.readFileSync(path.resolve('package.json'), 'utf8'));
const version = process.env.APP_VERSION || pkg.version;
const every = Number(process.env.TICK_MS || 100);
const log = (msg) => console.log(`${new Date().toISOString()} [${version} pid ${process.pid}] ${msg}`);

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://x');
  if (url.pathname === '/health') {
    res.writeHead(200, { 'content-type': 'text/plain' });
    res.end('ok\n');
    return;
  }
  if (url.pathname === '/slow') {
    const ms = Number(url.searchParams.get('ms') || 1000);
    setTimeout(() => { res.writeHead(200, { 'content-type': 'text/plain', 'x-app-version': version }); res.end(`${version} slow ${ms}\n`); }, ms);
    return;
  }
  if (url.pathname === '/events') {
    // Numbered events: a client that reconnects says where it was (Last-Event-ID), and sees
    // whether it lost any.
    let n = Number(req.headers['last-event-id'] || 0);
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', 'x-app-version': version });
    res.write(`retry: 100\n\n`);
    const timer = setInterval(() => { n += 1; res.write(`id: ${n}\ndata: ${version} ${n}\n\n`); }, every);
    req.on('close', () => clearInterval(timer));
    return;
  }
  res.writeHead(200, { 'content-type': 'text/plain', 'x-app-version': version });
  res.end(`hello from ${version}\n`);
});

// /ws: a message "version n" every tick; a message from the client is echoed back as "echo ...".
const wss = new WebSocketServer({ server, path: '/ws' });
wss.on('connection', (ws) => {
  let n = 0;
  const timer = setInterval(() => { n += 1; ws.send(`${version} ${n}`); }, every);
  ws.on('message', (data) => ws.send(`echo ${data}`));
  ws.on('close', () => clearInterval(timer));
  ws.on('error', () => clearInterval(timer));
});

function shutdown(signal) {
  log(`${signal}: closing (open connections end first)`);
  server.close(() => {
    log('closed, exiting');
    process.exit(0);
  });
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));

server.listen(port, '127.0.0.1', () => log(`listening on 127.0.0.1:${port}`));
