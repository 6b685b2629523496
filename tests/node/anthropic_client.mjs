// Drives the official `@anthropic-ai/sdk` npm package against a relay: node anthropic_client.mjs <scenario> <baseURL>
// Prints one JSON object with what the SDK assembled; the Python test compares it with the upstream.
import Anthropic from "@anthropic-ai/sdk";

const [scenario, baseURL] = process.argv.slice(2);
const client = new Anthropic({ baseURL, apiKey: "relay-token", maxRetries: 0 });
const messages = [{ role: "user", content: "hi" }];
const weather = { name: "get_weather", description: "Weather in a city.",
  input_schema: { type: "object", properties: { city: { type: "string" } }, required: ["city"] } };

async function run() {
  if (scenario === "stream") {
    const stream = await client.messages.create({ model: "openai/gpt-4.1", max_tokens: 100, messages, stream: true });
    let text = "", stop = null, outputTokens = null;
    for await (const event of stream) {
      if (event.type === "content_block_delta" && event.delta.type === "text_delta") text += event.delta.text;
      if (event.type === "message_delta") {
        stop = event.delta.stop_reason;
        outputTokens = event.usage.output_tokens;
      }
    }
    return { text, stop, output_tokens: outputTokens };
  }
  if (scenario === "whole") {
    // The SDK's own helper, reading through `event: ping` keepalives (the upstream pauses).
    const final = await client.messages.stream({ model: "anthropic/claude", max_tokens: 100, messages }).finalMessage();
    return { text: final.content.map((block) => block.text).join(""), stop: final.stop_reason };
  }
  if (scenario === "tools") {
    const answer = await client.messages.create({ model: "openai/gpt-4.1", max_tokens: 100, messages,
      tools: [weather] });
    const call = answer.content.find((block) => block.type === "tool_use");
    return { name: call.name, input: call.input, stop: answer.stop_reason };
  }
  if (scenario === "abort") {
    const controller = new AbortController();
    const stream = await client.messages.create({ model: "openai/gpt-4.1", max_tokens: 1000, messages, stream: true },
      { signal: controller.signal });
    let seen = 0;
    try {
      for await (const event of stream) {
        if (event.type === "content_block_delta" && ++seen === 3) controller.abort();
      }
    } catch (err) {
      return { seen, ended: err.name };
    }
    return { seen, ended: "quietly" };
  }
  if (scenario === "error") {
    try {
      await client.messages.create({ model: "openai/gpt-4.1", max_tokens: 10, messages: [] });
    } catch (err) {
      return { status: err.status, type: err.error?.error?.type, message: err.message };
    }
  }
  throw new Error(`unknown scenario ${scenario}`);
}

run().then((result) => console.log(JSON.stringify(result)), (err) => {
  console.log(JSON.stringify({ crashed: String(err) }));
  process.exit(1);
});
