'use strict';
const test = require('node:test');
const assert = require('node:assert');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { execFile } = require('node:child_process');

const dimension = require('./dimension.js');

// A real Unix socket server that decodes frames as the agent does.
function startServer() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dimjs'));
  const sock = path.join(dir, 'ev.sock');
  const events = [];
  let connections = 0;
  const waiters = [];
  const server = net.createServer((c) => {
    connections++;
    let buf = Buffer.alloc(0);
    c.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      while (buf.length >= 4) {
        const n = buf.readUInt32LE(0);
        assert.ok(n >= 1 && n <= dimension.MAX_FRAME, `frame length ${n}`);
        if (buf.length < 4 + n) break;
        events.push(JSON.parse(buf.subarray(4, 4 + n).toString('utf8')));
        buf = buf.subarray(4 + n);
      }
      for (const w of waiters.splice(0)) w();
    });
  });
  return new Promise((resolve) => server.listen(sock, () => resolve({
    sock,
    events,
    connections: () => connections,
    waitFor: async (n) => { while (events.length < n) await new Promise((r) => waiters.push(r)); },
    close: () => { server.close(); fs.rmSync(dir, { recursive: true, force: true }); },
  })));
}

test('send encodes the frame contract', async () => {
  const srv = await startServer();
  const c = new dimension.Client(srv.sock);
  assert.strictEqual(c.isConnected(), true);
  assert.strictEqual(await c.send('progress', { pct: 50 }, { step: 1 }), true);
  assert.strictEqual(await c.sendMessage('hello'), true);
  assert.strictEqual(await c.send('raw', Buffer.from('bytes')), true);
  await srv.waitFor(3);
  assert.deepStrictEqual(srv.events, [
    { kind: 'progress', body: { pct: 50 }, attrs: { step: '1' } },
    { body: 'hello' },
    { kind: 'raw', body: 'bytes' },
  ]);
  assert.strictEqual(srv.connections(), 1, 'one connection is reused');
  c.close();
  srv.close();
});

test('many sends keep their order on one connection', async () => {
  const srv = await startServer();
  const c = new dimension.Client(srv.sock);
  await Promise.all(Array.from({ length: 500 }, (_, i) => c.send('n', i)));
  await srv.waitFor(500);
  assert.deepStrictEqual(srv.events.map((e) => e.body), Array.from({ length: 500 }, (_, i) => i));
  c.close();
  srv.close();
});

test('bad input throws before anything is sent', () => {
  const c = new dimension.Client('/nonexistent.sock');
  assert.throws(() => c.send('k', undefined), TypeError);
  assert.throws(() => c.send(5, 1), TypeError);
  assert.throws(() => c.send('k', 'x'.repeat(dimension.MAX_FRAME)), RangeError);
});

test('outside dimension nothing is sent', async () => {
  const c = new dimension.Client('');
  assert.strictEqual(c.isConnected(), false);
  assert.strictEqual(await c.send('k', 1), false);
  const missing = new dimension.Client(path.join(os.tmpdir(), 'no-such-dim.sock'));
  assert.strictEqual(missing.isConnected(), false);
});

test('module functions use DIMENSION_EVENTS_SOCK, and the process exits once events are out', async () => {
  const srv = await startServer();
  const script = `const d = require(${JSON.stringify(path.join(__dirname, 'dimension.js'))});
    if (!d.isConnected()) process.exit(3);
    for (let i = 0; i < 3; i++) d.send('progress', { i });
    d.sendMessage({ done: true });`;
  await new Promise((resolve, reject) => {
    execFile(process.execPath, ['-e', script], { env: { ...process.env, DIMENSION_EVENTS_SOCK: srv.sock } }, (err) => (err ? reject(err) : resolve()));
  });
  await srv.waitFor(4);
  assert.deepStrictEqual(srv.events.map((e) => e.kind || 'bundle'), ['progress', 'progress', 'progress', 'bundle']);
  srv.close();
});
