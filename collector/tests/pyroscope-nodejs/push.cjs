// @pyroscope/nodejs (the npm package, as a Node service uses it) profiling
// this process and pushing to the collector: node push.cjs SERVER SECONDS.
// CPU is burnt in fathomNodeBusyLeaf (under wrapWithLabels, so its samples
// carry a pprof label), then stop() flushes the last wall and heap profiles.
'use strict';
const Pyroscope = require('@pyroscope/nodejs');

const [server, seconds] = [process.argv[2], Number(process.argv[3] || '3')];
if (!server) {
  console.error('usage: node push.cjs SERVER SECONDS');
  process.exit(2);
}

Pyroscope.init({
  serverAddress: server,
  appName: 'fathom-nodejs-test',
  flushIntervalMs: 1000,
  tags: { region: 'eu-west' },
  wall: { collectCpuTime: true },
});
Pyroscope.start();

function fathomNodeBusyLeaf(until) {
  let x = 0;
  while (Date.now() < until) {
    for (let i = 0; i < 10000; i++) x = (x * 31 + i) % 1000003;
  }
  return x;
}

async function main() {
  const cpu0 = process.cpuUsage();
  const end = Date.now() + seconds * 1000;
  let sink = 0;
  // Burn in 10 ms slices, the event loop turning between them as a
  // server's does (the SDK drops a profile while its last upload is still
  // in flight, and an upload takes several turns of the loop).
  while (Date.now() < end) {
    Pyroscope.wrapWithLabels({ endpoint: '/busy' }, () => {
      sink += fathomNodeBusyLeaf(Date.now() + 10);
    });
    await new Promise((r) => setImmediate(r));
  }
  const cpu = process.cpuUsage(cpu0);
  await Pyroscope.stop();
  // The CPU this process used while burning, for the test to compare.
  console.log(`cpu_ms=${Math.round((cpu.user + cpu.system) / 1000)} sink=${sink}`);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
