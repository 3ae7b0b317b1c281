// A plain Node HTTP service, no dependencies, that knows nothing about bluegreen:
// it reads PORT, answers /health, reports its version, and ends gracefully on SIGTERM.
'use strict';
const http = require('http');
const fs = require('fs');
const path = require('path');

const port = Number(process.env.PORT);
if (!port) {
  console.error('PORT is not set');
  process.exit(2);
}
// The build's own package.json (the build directory is the working directory).
const pkg = JSON.parse(fs.readFileSync(path.resolve('package.json'), 'utf8'));
const version = process.env.APP_VERSION || pkg.version;
const bootDelayMs = Number(process.env.BOOT_DELAY_MS || pkg.bootDelayMs || 0);
const log = (msg) => console.log(`${new Date().toISOString()} [${version} pid ${process.pid}] ${msg}`);

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://x');
  if (url.pathname === '/health') {
    res.writeHead(pkg.healthy === false ? 503 : 200, { 'content-type': 'text/plain' });
    res.end(pkg.healthy === false ? 'unhealthy\n' : 'ok\n');
    return;
  }
  if (url.pathname === '/slow') {
    const ms = Number(url.searchParams.get('ms') || 1000);
    const tag = url.searchParams.get('tag') || '';
    log(`slow request ${tag} started (${ms} ms)`);
    setTimeout(() => {
      res.writeHead(200, { 'content-type': 'text/plain', 'x-app-version': version });
      res.end(`${version} slow ${ms}\n`);
      log(`slow request ${tag} done`);
    }, ms);
    return;
  }
  res.writeHead(200, { 'content-type': 'text/plain', 'x-app-version': version });
  res.end(`hello from ${version}\n`);
});

function shutdown(signal) {
  log(`${signal}: closing (in-flight requests finish first)`);
  server.close(() => {
    log('closed, exiting');
    process.exit(0);
  });
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));

setTimeout(() => {
  server.listen(port, '127.0.0.1', () => log(`listening on 127.0.0.1:${port}`));
}, bootDelayMs);
