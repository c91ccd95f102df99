'use strict';
// Example dimension bundle: reads its JSON payload from stdin, reports
// progress and a result as events, writes a line to stderr, prints the
// payload to stdout, and exits with payload.exit_code (0 when absent).
//
// Install the SDK first (`npm install` here copies ../../sdk/js into
// node_modules, so the project is self-contained for `hyphae build`).
const dimension = require('@hyphae-run/dimension');

async function main() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  const raw = Buffer.concat(chunks).toString('utf8');
  let payload;
  try {
    payload = JSON.parse(raw);
  } catch (err) {
    process.stderr.write(`echo-js: the payload is not JSON: ${err.message}\n`);
    return 1;
  }
  for (let step = 1; step <= 3; step++) {
    await dimension.send('progress', { step, of: 3 });
  }
  await dimension.send('result', { echo: payload }, { lang: 'js' });
  process.stderr.write(`echo-js: echoed ${Buffer.byteLength(raw)} bytes\n`);
  process.stdout.write(raw);
  const code = payload && typeof payload.exit_code === 'number' ? payload.exit_code : 0;
  return code;
}

main().then((code) => { process.exitCode = code; });
