// The official `openai` npm package against the running stack, run by Node's test runner.
// tests/sdk/test_openai_node.py installs the package and sets MP_OPENAI_PACKAGE, OPENAI_BASE_URL,
// OPENAI_API_KEY, MP_TEXT_MODEL (tiny random model) and MP_TOOL_MODEL (the scripted tool caller).
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { test } from "node:test";

const require = createRequire(import.meta.url);
const { OpenAI, NotFoundError, BadRequestError } = require(process.env.MP_OPENAI_PACKAGE);

const client = new OpenAI({ maxRetries: 0, timeout: 60_000 });
const TEXT_MODEL = process.env.MP_TEXT_MODEL;
const TOOL_MODEL = process.env.MP_TOOL_MODEL;
const HELLO = [{ role: "user", content: "Hello, how are you?" }];
const WEATHER = {
  type: "function",
  function: {
    name: "get_weather",
    description: "Current weather in a city",
    parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
  },
};

test("chat: non-stream and stream give the same greedy text", async () => {
  const whole = await client.chat.completions.create({ model: TEXT_MODEL, messages: HELLO, max_tokens: 10, temperature: 0 });
  assert.equal(whole.object, "chat.completion");
  assert.equal(whole.choices[0].finish_reason, "length");
  assert.equal(whole.usage.completion_tokens, 10);
  const stream = await client.chat.completions.create({
    model: TEXT_MODEL,
    messages: HELLO,
    max_tokens: 10,
    temperature: 0,
    stream: true,
    stream_options: { include_usage: true },
  });
  let text = "";
  let last;
  for await (const chunk of stream) {
    if (chunk.choices.length) text += chunk.choices[0].delta.content ?? "";
    last = chunk;
  }
  assert.equal(text, whole.choices[0].message.content);
  assert.equal(last.usage.completion_tokens, 10);
});

test("chat: tool calls, whole and streamed with index and id", async () => {
  const messages = [{ role: "user", content: "Weather in Paris?" }];
  const whole = await client.chat.completions.create({ model: TOOL_MODEL, messages, tools: [WEATHER] });
  assert.equal(whole.choices[0].finish_reason, "tool_calls");
  const [call] = whole.choices[0].message.tool_calls;
  assert.equal(call.function.name, "get_weather");
  assert.deepEqual(JSON.parse(call.function.arguments), { city: "Paris" });
  const runner = client.chat.completions.stream({ model: TOOL_MODEL, messages, tools: [WEATHER] });
  const final = await runner.finalChatCompletion();
  const [streamed] = final.choices[0].message.tool_calls;
  assert.equal(streamed.index ?? 0, 0);
  assert.ok(streamed.id);
  assert.deepEqual(JSON.parse(streamed.function.arguments), { city: "Paris" });
  assert.equal(final.choices[0].message.content, whole.choices[0].message.content);
});

test("completions: text, stream, echo", async () => {
  const whole = await client.completions.create({ model: TEXT_MODEL, prompt: "The quick", max_tokens: 6, temperature: 0 });
  assert.equal(whole.object, "text_completion");
  const stream = await client.completions.create({
    model: TEXT_MODEL,
    prompt: "The quick",
    max_tokens: 6,
    temperature: 0,
    stream: true,
  });
  let text = "";
  for await (const chunk of stream) text += chunk.choices[0]?.text ?? "";
  assert.equal(text, whole.choices[0].text);
  const echoed = await client.completions.create({ model: TEXT_MODEL, prompt: "The quick", max_tokens: 6, temperature: 0, echo: true });
  assert.equal(echoed.choices[0].text, "The quick" + whole.choices[0].text);
});

test("responses: previous_response_id, stream events, retrieve and delete", async () => {
  const first = await client.responses.create({ model: TEXT_MODEL, input: "Tell me about the sea.", max_output_tokens: 5, temperature: 0 });
  assert.equal(first.object, "response");
  assert.ok(first.output_text.length > 0);
  const second = await client.responses.create({
    model: TEXT_MODEL,
    input: "And the sky?",
    previous_response_id: first.id,
    max_output_tokens: 3,
  });
  assert.ok(second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens);
  const events = [];
  const stream = await client.responses.create({ model: TOOL_MODEL, input: "Weather?", tools: [{ type: "function", ...WEATHER.function }], stream: true });
  for await (const event of stream) events.push(event);
  const kinds = events.map((e) => e.type);
  assert.equal(kinds[0], "response.created");
  assert.equal(kinds.at(-1), "response.completed");
  assert.ok(kinds.includes("response.output_text.delta"));
  assert.ok(kinds.includes("response.function_call_arguments.done"));
  assert.deepEqual(events.map((e) => e.sequence_number), [...events.keys()]);
  const final = events.at(-1).response;
  assert.deepEqual(final.output.map((i) => i.type), ["message", "function_call"]);
  assert.equal((await client.responses.retrieve(first.id)).id, first.id);
  await client.responses.delete(first.id);
  await assert.rejects(client.responses.retrieve(first.id), NotFoundError);
});

test("errors: the OpenAI envelope reaches the SDK as typed errors", async () => {
  await assert.rejects(
    client.chat.completions.create({ model: TEXT_MODEL, messages: HELLO, max_tokens: 0 }),
    (err) => err instanceof BadRequestError && err.param === "max_tokens",
  );
});
