// Drives a running `moeflux serve` with the official OpenAI client (npm "openai"): models, chat,
// streaming chat with usage, completions (plain and streamed), stop strings, and the errors the
// client maps to its exception classes. Exits non-zero with a message on the first failure.
//
//   node tests/server/openai_client.mjs BASE_URL NODE_MODULES_PARENT API_KEY
// BASE_URL is http://127.0.0.1:PORT/v1; NODE_MODULES_PARENT the directory holding node_modules
// (build/third_party, where scripts/setup.sh installs the client).
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { resolve } from 'node:path';

const [baseURL, modulesParent, apiKey] = process.argv.slice(2);
const require = createRequire(resolve(modulesParent) + '/');
const openai = require('openai');
const OpenAI = openai.default ?? openai;
const client = new OpenAI({ apiKey, baseURL, maxRetries: 0, timeout: 300_000 });

const messages = [
  { role: 'system', content: 'You are a helpful assistant.' },
  { role: 'user', content: 'And God said, Let there be light:' },
];

async function collectChat(params) {
  const stream = await client.chat.completions.create({ ...params, stream: true,
                                                          stream_options: { include_usage: true } });
  let content = '', finish = null, usage = null, role = null, chunks = 0;
  for await (const chunk of stream) {
    chunks++;
    assert.equal(chunk.object, 'chat.completion.chunk');
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices) {
      if (c.delta.role) role = c.delta.role;
      if (c.delta.content) content += c.delta.content;
      if (c.finish_reason) finish = c.finish_reason;
    }
  }
  return { content, finish, usage, role, chunks };
}

async function main() {
  const models = await client.models.list();
  assert.equal(models.data.length, 1);
  const model = models.data[0].id;
  assert.ok(model.length > 0);

  // Chat, then the same request streamed: same seed, same text, same usage.
  const params = { model, messages, max_tokens: 24, temperature: 0.8, seed: 1234 };
  const chat = await client.chat.completions.create(params);
  assert.equal(chat.object, 'chat.completion');
  assert.equal(chat.choices.length, 1);
  const msg = chat.choices[0].message;
  assert.equal(msg.role, 'assistant');
  assert.equal(typeof msg.content, 'string');
  assert.ok(['stop', 'length'].includes(chat.choices[0].finish_reason));
  assert.ok(chat.usage.prompt_tokens > 10);
  assert.ok(chat.usage.completion_tokens >= 1 && chat.usage.completion_tokens <= 24);
  assert.equal(chat.usage.total_tokens, chat.usage.prompt_tokens + chat.usage.completion_tokens);

  const streamed = await collectChat(params);
  assert.equal(streamed.role, 'assistant');
  assert.equal(streamed.content, msg.content, 'streamed text differs from the non-streamed text');
  assert.equal(streamed.finish, chat.choices[0].finish_reason);
  assert.ok(streamed.usage, 'no usage chunk with stream_options.include_usage');
  assert.equal(streamed.usage.completion_tokens, chat.usage.completion_tokens);
  assert.equal(streamed.usage.prompt_tokens, chat.usage.prompt_tokens);

  // Greedy: the same text twice.
  const greedy = { model, messages, max_tokens: 16, temperature: 0 };
  const g1 = await client.chat.completions.create(greedy);
  const g2 = await client.chat.completions.create(greedy);
  assert.equal(g1.choices[0].message.content, g2.choices[0].message.content);

  // Stop strings never reach the client.
  const stopped = await client.chat.completions.create({ ...params, max_tokens: 64, stop: ['e', '\n'] });
  assert.ok(!stopped.choices[0].message.content.includes('e'));
  assert.ok(!stopped.choices[0].message.content.includes('\n'));

  // Completions, plain and streamed.
  const cparams = { model, prompt: 'In the beginning God created', max_tokens: 20, temperature: 0.7, seed: 99 };
  const comp = await client.completions.create(cparams);
  assert.equal(comp.object, 'text_completion');
  assert.equal(typeof comp.choices[0].text, 'string');
  assert.ok(comp.usage.completion_tokens >= 1);
  const cstream = await client.completions.create({ ...cparams, stream: true });
  let ctext = '';
  for await (const chunk of cstream) for (const c of chunk.choices) ctext += c.text;
  assert.equal(ctext, comp.choices[0].text, 'streamed completion differs');

  // Errors become the client's exception classes with the server's message and param.
  await assert.rejects(client.chat.completions.create({ ...params, n: 2 }), (e) => {
    assert.ok(e instanceof OpenAI.BadRequestError, `expected BadRequestError, got ${e}`);
    assert.equal(e.status, 400);
    assert.equal(e.param, 'n');
    return true;
  });
  await assert.rejects(client.chat.completions.create({ ...params, temperature: 'hot' }), (e) => {
    assert.equal(e.status, 400);
    assert.equal(e.param, 'temperature');
    return true;
  });
  if (apiKey) {
    const wrong = new OpenAI({ apiKey: apiKey + 'x', baseURL, maxRetries: 0 });
    await assert.rejects(wrong.models.list(), (e) => {
      assert.ok(e instanceof OpenAI.AuthenticationError, `expected AuthenticationError, got ${e}`);
      return true;
    });
  }
  console.log(JSON.stringify({ ok: true, model, chat: msg.content, completion: comp.choices[0].text }));
}

main().catch((e) => {
  console.error('openai_client:', e?.stack ?? e);
  process.exit(1);
});
