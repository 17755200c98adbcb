// Token counts for tests/cli_run_test.cpp CliChat.SecondTurnEvaluatesOnlyItsOwnTokens from an
// independent tokenizer: tokenizers.js (npm @huggingface/tokenizers 0.2.0), not moeflux's.
//   npm install --prefix /tmp/tokjs @huggingface/tokenizers@0.2.0
//   NODE_PATH=/tmp/tokjs/node_modules node tools/refs/cli_chat_counts.mjs models/demo \
//     40,364,304,323,1139,332,545,304
// (the second argument: the 8 greedy answer ids that `moeflux chat -v` prints for the first turn).
// With --check-valid DIR it first checks that tokenizers.js gives HF's ids for DIR/valid.txt
// (DIR/hf_reference.json: count and sha256), e.g. tests/data/demo.
import fs from "fs";
import crypto from "crypto";
import { createRequire } from "module";

const require = createRequire(process.env.NODE_PATH ? process.env.NODE_PATH + "/" : import.meta.url);
const { Tokenizer } = require("@huggingface/tokenizers");

const args = process.argv.slice(2);
const load = (d) =>
  new Tokenizer(JSON.parse(fs.readFileSync(d + "/tokenizer.json")),
                JSON.parse(fs.readFileSync(d + "/tokenizer_config.json")));
if (args[0] === "--check-valid") {
  const d = args[1];
  const ids = load(d).encode(fs.readFileSync(d + "/valid.txt", "utf8"), { add_special_tokens: false }).ids;
  const buf = Buffer.alloc(ids.length * 4);
  ids.forEach((v, i) => buf.writeInt32LE(v, i * 4));
  const ref = JSON.parse(fs.readFileSync(d + "/hf_reference.json"));
  const sha = crypto.createHash("sha256").update(buf).digest("hex");
  const ok = ids.length === ref.valid_tokens && ref.valid_token_ids_sha256.startsWith(sha);
  console.log(`valid.txt: ${ids.length} tokens, sha256 ${sha}: ${ok ? "equal to HF" : "DIFFERENT from HF"}`);
  if (!ok) process.exit(1);
  args.splice(0, 2);
}
const [dir, answer_ids] = args;
const tok = load(dir);
const enc = (s) => tok.encode(s, { add_special_tokens: false }).ids;
const gen = answer_ids.split(",").map(Number);
// The built-in ChatML (the demo has no template): a user turn, then the generation prompt.
const turn1 = "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n";
const p1 = enc(turn1);
const answer = tok.decode(gen, { skip_special_tokens: false });
const p2 = enc(turn1 + answer + "<|im_end|>\n<|im_start|>user\nhow are you<|im_end|>\n<|im_start|>assistant\n");
// What the session holds after turn 1: its prompt and all but the last answer token.
const kept = p1.concat(gen.slice(0, -1));
let common = 0;
while (common < kept.length && kept[common] === p2[common]) common++;
console.log(JSON.stringify({ answer, turn1_tokens: p1.length, turn2_total: p2.length,
                             kept: kept.length, common_prefix: common, turn2_new: p2.length - common }));
