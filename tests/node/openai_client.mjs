// Drives the official `openai` npm package against a relay: node openai_client.mjs <scenario> <baseURL>
// Prints one JSON object with what the SDK assembled; the Python test compares it with the upstream.
import OpenAI from "openai";

const [scenario, baseURL] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "relay-token", maxRetries: 0 });
const messages = [{ role: "user", content: "hi" }];
const weather = { type: "function", function: { name: "get_weather", parameters: { type: "object",
  properties: { city: { type: "string" } }, required: ["city"] } } };

async function run() {
  if (scenario === "stream") {
    const stream = await client.chat.completions.create({ model: "openai/gpt-4.1", messages, stream: true,
      stream_options: { include_usage: true } });
    let text = "", finish = null, usage = null;
    for await (const chunk of stream) {
      if (chunk.choices.length) {
        text += chunk.choices[0].delta.content ?? "";
        finish = chunk.choices[0].finish_reason ?? finish;
      } else usage = chunk.usage;
    }
    return { text, finish, usage };
  }
  if (scenario === "whole") {
    const answer = await client.chat.completions.create({ model: "anthropic/claude", messages });
    return { text: answer.choices[0].message.content, finish: answer.choices[0].finish_reason };
  }
  if (scenario === "tools") {
    // The SDK's own helper assembles streamed tool call fragments.
    const runner = client.chat.completions.stream({ model: "openai/gpt-4.1", messages, tools: [weather] });
    const final = await runner.finalChatCompletion();
    const call = final.choices[0].message.tool_calls[0];
    return { name: call.function.name, arguments: JSON.parse(call.function.arguments),
             finish: final.choices[0].finish_reason };
  }
  if (scenario === "abort") {
    const controller = new AbortController();
    const stream = await client.chat.completions.create({ model: "openai/gpt-4.1", messages, stream: true },
      { signal: controller.signal });
    let seen = 0;
    try {
      for await (const chunk of stream) {
        if (++seen === 3) controller.abort();
      }
    } catch (err) {
      return { seen, ended: err.name };
    }
    return { seen, ended: "quietly" };  // this SDK ends the iteration on abort without throwing
  }
  if (scenario === "error") {
    try {
      await client.chat.completions.create({ model: "openai/gpt-4.1", messages: [] });
    } catch (err) {
      return { status: err.status, type: err.type ?? err.error?.type, message: err.message };
    }
  }
  if (scenario === "responses-stream") {
    const stream = await client.responses.create({ model: "openai/gpt-4.1", input: "hi", stream: true });
    let text = "", status = null, events = 0;
    const sequence = [];
    for await (const event of stream) {
      events += 1;
      sequence.push(event.sequence_number);
      if (event.type === "response.output_text.delta") text += event.delta;
      if (event.type === "response.completed") status = event.response.status;
    }
    return { text, status, events, sequence };
  }
  if (scenario === "responses-whole") {
    const response = await client.responses.create({ model: "anthropic/claude", input: "hi" });
    return { text: response.output_text, status: response.status };
  }
  if (scenario === "responses-tools") {
    // The SDK's own stream helper assembles the function call item.
    const stream = client.responses.stream({ model: "openai/gpt-4.1", input: "weather in Paris?",
      tools: [{ type: "function", name: "get_weather", parameters: weather.function.parameters, strict: false }] });
    const final = await stream.finalResponse();
    const call = final.output[0];
    return { type: call.type, name: call.name, arguments: JSON.parse(call.arguments) };
  }
  throw new Error(`unknown scenario ${scenario}`);
}

run().then((result) => console.log(JSON.stringify(result)), (err) => {
  console.log(JSON.stringify({ crashed: String(err) }));
  process.exit(1);
});
