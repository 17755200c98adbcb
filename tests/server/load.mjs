// Bounded load test of a running `moeflux serve` with the official OpenAI client: CLIENTS
// concurrent clients each make REQUESTS streaming chat requests (seeded, sampled), each followed
// by the same request not streamed; every request must complete and each streamed text must
// equal its non-streamed twin. Prints one JSON line of results; exits non-zero on any failure.
//
//   node tests/server/load.mjs BASE_URL NODE_MODULES_PARENT API_KEY CLIENTS REQUESTS MAX_TOKENS
import { createRequire } from 'node:module';
import { resolve } from 'node:path';

const [baseURL, modulesParent, apiKey, clientsArg, requestsArg, maxTokensArg] = process.argv.slice(2);
const require = createRequire(resolve(modulesParent) + '/');
const openai = require('openai');
const OpenAI = openai.default ?? openai;
const CLIENTS = Number(clientsArg ?? 8), REQUESTS = Number(requestsArg ?? 20);
const MAX_TOKENS = Number(maxTokensArg ?? 8);

const openings = ['In the beginning', 'It is a truth universally acknowledged', 'And it came to pass',
  'Emma Woodhouse, handsome, clever, and rich', 'Blessed are the meek', 'The LORD is my shepherd',
  'Mr. Darcy', 'Vanity of vanities'];

async function runClient(c, stats) {
  const client = new OpenAI({ apiKey, baseURL, maxRetries: 0, timeout: 600_000 });
  const models = await client.models.list();
  const model = models.data[0].id;
  for (let i = 0; i < REQUESTS; i++) {
    const params = {
      model,
      messages: [{ role: 'user', content: `${openings[(c + i) % openings.length]} (${c}.${i})` }],
      max_tokens: MAX_TOKENS, temperature: 0.9, seed: c * 1000 + i,
    };
    const t0 = performance.now();
    let text = '', finish = null, first = null;
    try {
      const stream = await client.chat.completions.create({ ...params, stream: true });
      for await (const chunk of stream)
        for (const ch of chunk.choices) {
          if (ch.delta.content) {
            if (first === null) first = performance.now() - t0;
            text += ch.delta.content;
          }
          if (ch.finish_reason) finish = ch.finish_reason;
        }
      stats.latency.push(performance.now() - t0);
      if (first !== null) stats.ttft.push(first);
      if (!finish) throw new Error('stream ended without a finish_reason');
      stats.streamed++;
      const plain = await client.chat.completions.create(params);
      stats.plain++;
      stats.tokens += plain.usage.completion_tokens;
      if (plain.choices[0].message.content !== text) {
        stats.mismatches++;
        if (stats.examples.length < 3)
          stats.examples.push({ seed: params.seed, streamed: text, plain: plain.choices[0].message.content });
      }
    } catch (e) {
      stats.errors++;
      if (stats.examples.length < 3) stats.examples.push({ seed: params.seed, error: String(e) });
    }
  }
}

const pct = (xs, p) => {
  if (!xs.length) return 0;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(p * s.length))];
};

const stats = { streamed: 0, plain: 0, errors: 0, mismatches: 0, tokens: 0, latency: [], ttft: [], examples: [] };
const t0 = performance.now();
await Promise.all(Array.from({ length: CLIENTS }, (_, c) => runClient(c, stats)));
const seconds = (performance.now() - t0) / 1000;
const out = {
  clients: CLIENTS, requests_per_client: REQUESTS, max_tokens: MAX_TOKENS,
  streamed: stats.streamed, plain: stats.plain, errors: stats.errors, mismatches: stats.mismatches,
  seconds: Number(seconds.toFixed(2)),
  requests_per_s: Number(((stats.streamed + stats.plain) / seconds).toFixed(2)),
  gen_tokens_per_s: Number((2 * stats.tokens / seconds).toFixed(1)),
  stream_latency_ms_p50: Number(pct(stats.latency, 0.5).toFixed(1)),
  stream_latency_ms_p95: Number(pct(stats.latency, 0.95).toFixed(1)),
  ttft_ms_p50: Number(pct(stats.ttft, 0.5).toFixed(1)),
  ttft_ms_p95: Number(pct(stats.ttft, 0.95).toFixed(1)),
  examples: stats.examples,
};
console.log(JSON.stringify(out));
process.exit(stats.errors || stats.mismatches || stats.streamed !== CLIENTS * REQUESTS ? 1 : 0);
