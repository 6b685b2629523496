// Drives the `ai` npm package's own chat transport and UI message stream reader against a
// relay: node ai_client.mjs <scenario> <relay URL>. Prints one JSON object. The `responses`
// scenario is the AI SDK's OpenAI provider pointed at the relay's /v1 (it speaks the Responses API).
import { createOpenAI } from "@ai-sdk/openai";
import { DefaultChatTransport, readUIMessageStream, streamText } from "ai";

const [scenario, base] = process.argv.slice(2);
const user = (text) => ({ id: `u-${text.length}`, role: "user", parts: [{ type: "text", text }] });

async function send(body, messages, { abortAfter } = {}) {
  const controller = new AbortController();
  const transport = new DefaultChatTransport({ api: `${base}/api/chat/ui`, body });
  const stream = await transport.sendMessages({ chatId: "chat-1", messages, trigger: "submit-message",
                                                messageId: undefined, abortSignal: controller.signal });
  let message = null, updates = 0;
  try {
    for await (const current of readUIMessageStream({ stream })) {
      message = current;
      updates += 1;
      if (abortAfter && updates === abortAfter) controller.abort();
    }
  } catch (err) {
    return { message, updates, ended: err.name };
  }
  return { message, updates, ended: "finished" };
}

const textOf = (message) => message.parts.filter((p) => p.type === "text").map((p) => p.text).join("");

async function run() {
  if (scenario === "text") {
    const { message, updates } = await send({ provider: "openai" }, [user("hi")]);
    return { role: message.role, text: textOf(message), updates };
  }
  if (scenario === "tools") {
    const { message } = await send({ provider: "demo", model: "demo-fast", tools: true }, [user("what is 6 * 7?")]);
    const tool = message.parts.find((p) => p.type === "tool-calculate");
    return { text: textOf(message), tool: { state: tool.state, input: tool.input, output: tool.output } };
  }
  if (scenario === "history") {
    const first = await send({ provider: "demo", model: "demo-fast", tools: true }, [user("what is 6 * 7?")]);
    const second = await send({ provider: "openai" }, [user("what is 6 * 7?"), first.message, user("and now?")]);
    return { text: textOf(second.message) };
  }
  if (scenario === "abort") {
    const { updates, ended } = await send({ provider: "openai" }, [user("go on")], { abortAfter: 3 });
    return { updates, ended };
  }
  if (scenario === "error") {
    const { message } = await send({ provider: "anthropic" }, [user("hi")]).catch((err) => ({ message: { parts: [] }, err }));
    return { text: message ? textOf(message) : null };
  }
  if (scenario === "responses") {
    const openai = createOpenAI({ baseURL: base, apiKey: "relay-token" });
    const result = streamText({ model: openai("gemini/gemini-2.5-flash"), prompt: "hi" });
    let text = "";
    for await (const piece of result.textStream) text += piece;
    return { text, finishReason: await result.finishReason, usage: await result.usage };
  }
  if (scenario === "responses-turns") {
    // A second turn: the SDK refers to its earlier answer by item id (store is on by default).
    const openai = createOpenAI({ baseURL: base, apiKey: "relay-token" });
    const model = openai("openai/gpt-4.1");
    const messages = [{ role: "user", content: "hi" }];
    const first = streamText({ model, messages });
    messages.push(...(await first.response).messages, { role: "user", content: "and then?" });
    const second = streamText({ model, messages });
    return { first: await first.text, second: await second.text };
  }
  throw new Error(`unknown scenario ${scenario}`);
}

run().then((result) => console.log(JSON.stringify(result)), (err) => {
  console.log(JSON.stringify({ crashed: String(err), name: err.name }));
  process.exit(0);
});
