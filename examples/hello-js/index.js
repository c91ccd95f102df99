// hyphae example program: prints a recognizable line, the GREETING
// environment variable when set, and exits with EXIT_CODE (default 0).
'use strict';

console.log('hello from js');
if (process.env.GREETING !== undefined) {
  console.log(`GREETING=${process.env.GREETING}`);
}
const code = Number.parseInt(process.env.EXIT_CODE ?? '0', 10);
process.exitCode = Number.isNaN(code) ? 2 : code;
