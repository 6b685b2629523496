// The demo chat page: pickers, history, the answer growing token by token, the model's
// reasoning in a collapsible "Thinking" block above it, images attached by button, paste or
// drop, Stop, errors, time to first token and tokens per second, and Markdown rendered into
// DOM nodes only: model output is never parsed as HTML, so it cannot inject markup or script.

import { EventTransportClient } from "./transport.js";

const $ = (id) => document.getElementById(id);
const capabilities = JSON.parse($("capabilities").textContent);
const STORAGE_KEY = "llm-sse-relay:chat";
const TOKEN_KEY = "llm-sse-relay:token";

// The server keeps the conversation (history, tool calls); the page keeps only its id.
// `images` are the attachments of the message being written: {type, url (a data: URL)}.
const state = { client: null, conversationId: null, images: [] };
// What the relay takes (docs/http-api.md, images): checked here too, so a wrong file is
// refused at once with a clear note instead of after the upload.
const IMAGE_TYPES = ["image/png", "image/jpeg", "image/gif", "image/webp"];
const MAX_IMAGE_BYTES = 5 * 1024 * 1024;
const MAX_IMAGES = 4;

// ------------------------------------------------------------------ Markdown (safe)

function appendInline(parent, text) {
  // `code`, **bold**, *italic*, [text](http…) — everything else is literal text.
  const pattern = /(`[^`\n]+`)|(\*\*[^*\n]+\*\*)|(\*[^*\s][^*\n]*\*)|(\[[^\]\n]+\]\((https?:\/\/[^)\s]+)\))/g;
  let last = 0;
  for (const match of text.matchAll(pattern)) {
    if (match.index > last) parent.append(text.slice(last, match.index));
    const [whole] = match;
    let node;
    if (match[1]) {
      node = document.createElement("code");
      node.textContent = whole.slice(1, -1);
    } else if (match[2]) {
      node = document.createElement("strong");
      node.textContent = whole.slice(2, -2);
    } else if (match[3]) {
      node = document.createElement("em");
      node.textContent = whole.slice(1, -1);
    } else {
      node = document.createElement("a");
      node.textContent = whole.slice(1, whole.indexOf("]("));
      node.href = match[5]; // only http(s) URLs match the pattern
      node.rel = "noopener noreferrer";
      node.target = "_blank";
    }
    parent.append(node);
    last = match.index + whole.length;
  }
  if (last < text.length) parent.append(text.slice(last));
}

export function renderMarkdown(container, source) {
  container.replaceChildren();
  const lines = source.split("\n");
  let i = 0;
  let paragraph = [];
  let list = null;
  const flushParagraph = () => {
    if (!paragraph.length) return;
    const p = document.createElement("p");
    paragraph.forEach((line, n) => {
      if (n) p.append(document.createElement("br"));
      appendInline(p, line);
    });
    container.append(p);
    paragraph = [];
  };
  const closeList = () => {
    list = null;
  };
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^```\s*([\w+-]*)\s*$/);
    if (fence) {
      flushParagraph();
      closeList();
      const code = [];
      i += 1;
      while (i < lines.length && !/^```\s*$/.test(lines[i])) code.push(lines[i++]);
      i += 1; // the closing fence (absent while the answer is still streaming)
      const pre = document.createElement("pre");
      const el = document.createElement("code");
      if (fence[1]) el.dataset.lang = fence[1];
      el.textContent = code.join("\n");
      pre.append(el);
      container.append(pre);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
    const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
    if (heading) {
      flushParagraph();
      closeList();
      const h = document.createElement(`h${Math.min(6, heading[1].length + 2)}`);
      appendInline(h, heading[2]);
      container.append(h);
    } else if (bullet || numbered) {
      flushParagraph();
      const tag = bullet ? "ul" : "ol";
      if (!list || list.tagName.toLowerCase() !== tag) {
        list = document.createElement(tag);
        container.append(list);
      }
      const li = document.createElement("li");
      appendInline(li, (bullet || numbered)[1]);
      list.append(li);
    } else if (!line.trim()) {
      flushParagraph();
      closeList();
    } else {
      closeList();
      paragraph.push(line);
    }
    i += 1;
  }
  flushParagraph();
}

// ------------------------------------------------------------------ page

function save() {
  try {
    localStorage.setItem(STORAGE_KEY, JSON.stringify({ conversationId: state.conversationId }));
  } catch (_) {
    /* private mode or full: the chat still works, it just won't survive a reload */
  }
}

function toolNote(el, tool, body) {
  // One line per call, updated in place: "calling calculate…" then its result.
  const key = `${tool.name}:${tool.arguments}`;
  let note = [...el.querySelectorAll(".tool")].find((n) => n.dataset.key === key && n.dataset.status === "running");
  if (!note) {
    note = document.createElement("div");
    note.className = "tool";
    note.dataset.key = key;
    el.insertBefore(note, body);
  }
  note.dataset.status = tool.status;
  if (tool.status === "round_limit") note.textContent = `🔧 tool limit reached (${tool.rounds} rounds)`;
  else if (tool.status === "running") note.textContent = `🔧 calling ${tool.name}(${tool.arguments})…`;
  else note.textContent = `🔧 ${tool.name}(${tool.arguments}) → ${tool.result_preview ?? tool.result ?? ""}`;
}

function thumbnail(url) {
  const img = document.createElement("img");
  img.className = "thumb";
  img.alt = "attached image";
  // Only data: URLs made from the user's own file (or stored with the conversation) are
  // shown; the page never loads an image from elsewhere (the CSP allows 'self' and data:).
  if (url.startsWith("data:image/")) img.src = url;
  return img;
}

function addMessage(role, text = "", images = []) {
  $("messages").querySelector(".empty")?.remove();
  const el = document.createElement("article");
  el.className = `msg ${role}`;
  if (images.length) {
    const strip = document.createElement("div");
    strip.className = "images";
    strip.append(...images.map(thumbnail));
    el.append(strip);
  }
  const body = document.createElement("div");
  body.className = "body";
  el.append(body);
  if (role === "user") body.textContent = text;
  else renderMarkdown(body, text);
  $("messages").append(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

// The model's visible reasoning: open while it streams, folded once the answer starts.
function thinkingBlock(el) {
  let block = el.querySelector(".thinking");
  if (!block) {
    block = document.createElement("details");
    block.className = "thinking";
    const summary = document.createElement("summary");
    summary.textContent = "Thinking…";
    const text = document.createElement("div");
    text.className = "thinking-text";
    block.append(summary, text);
    el.insertBefore(block, el.querySelector(".body"));
  }
  return block;
}

function addReasoning(el, text) {
  const block = thinkingBlock(el);
  block.querySelector(".thinking-text").append(text); // plain text, never markup
  return block;
}

function foldThinking(el, seconds) {
  const block = el.querySelector(".thinking");
  if (!block || block.dataset.folded) return;
  block.dataset.folded = "1";
  block.open = false;
  block.querySelector("summary").textContent = seconds === null ? "Thoughts" : `Thought for ${seconds.toFixed(1)} s`;
}

// A user record's content: a string, or a list of text and image parts.
function contentOf(content) {
  if (typeof content === "string") return { text: content, images: [] };
  const parts = Array.isArray(content) ? content : [];
  const text = parts.filter((p) => p.type === "text").map((p) => p.text).join("");
  const images = parts
    .filter((p) => p.type === "image_url" || p.type === "image")
    .map((p) => p.image_url?.url || (p.data ? `data:${p.media_type};base64,${p.data}` : p.url || ""));
  return { text, images };
}

function showError(el, message) {
  const box = document.createElement("div");
  box.className = "error";
  box.setAttribute("role", "alert");
  box.textContent = message;
  el.append(box);
}

function fillPickers() {
  const providers = capabilities.providers;
  const provider = $("provider");
  for (const name of Object.keys(providers)) provider.append(new Option(name, name));
  provider.value = providers[capabilities.default_provider] ? capabilities.default_provider : Object.keys(providers)[0];
  const transport = $("transport");
  transport.append(new Option("auto", "auto"));
  for (const name of capabilities.transports) transport.append(new Option(name, name));
  const updateModels = () => {
    const info = providers[provider.value] || { models: [], default_model: "" };
    $("models").replaceChildren(...info.models.map((m) => new Option(m, m)));
    $("model").value = info.default_model;
  };
  provider.addEventListener("change", updateModels);
  updateModels();
  $("temperature").addEventListener("input", () => ($("temperature-value").textContent = $("temperature").value));
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("prompt").disabled = busy;
}

async function send(prompt, images) {
  addMessage("user", prompt, images.map((image) => image.url));
  const el = addMessage("assistant");
  el.dataset.state = "streaming";
  const body = el.querySelector(".body");
  const cursor = document.createElement("span");
  cursor.className = "cursor";
  body.append(cursor);

  // With images the new message is a list of parts (OpenAI's shape), else a plain prompt.
  const message = images.length
    ? {
        messages: [{
          role: "user",
          content: [
            ...(prompt ? [{ type: "text", text: prompt }] : []),
            ...images.map((image) => ({ type: "image_url", image_url: { url: image.url } })),
          ],
        }],
      }
    : { prompt };
  const payload = {
    ...message,
    conversation_id: state.conversationId || undefined,
    provider: $("provider").value,
    model: $("model").value || undefined,
    temperature: Number($("temperature").value),
    system: $("system").value.trim() || undefined,
    tools: $("tools").checked || undefined,
    reasoning: $("reasoning").value || undefined,
  };
  const token = $("token").value.trim() || null;
  const client = new EventTransportClient({ transport: $("transport").value, payload, capabilities, token });
  state.client = client;
  setBusy(true);

  let text = "";
  let tokens = 0;
  let firstTokenAt = null;
  let scheduled = false;
  const started = performance.now();
  const paint = () => {
    scheduled = false;
    renderMarkdown(body, text);
    if (el.dataset.state === "streaming") body.append(cursor);
    el.scrollIntoView({ block: "end" });
  };
  let thinkingSince = null;
  const onEvent = (event, data) => {
    if (event === "reasoning") {
      if (thinkingSince === null) thinkingSince = performance.now();
      const block = addReasoning(el, data.text);
      if (!block.dataset.folded) block.open = true;
    } else if (event === "token") {
      if (firstTokenAt === null) {
        firstTokenAt = performance.now();
        foldThinking(el, thinkingSince === null ? null : (firstTokenAt - thinkingSince) / 1000);
      }
      tokens += 1;
      text += data.text;
      if (!scheduled) {
        scheduled = true;
        requestAnimationFrame(paint);
      }
    } else if (event === "meta" && data.tool) {
      toolNote(el, data.tool, body);
    } else if (event === "msgid") {
      el.dataset.streamId = data.id;
      if (data.conversation_id && data.conversation_id !== state.conversationId) {
        state.conversationId = data.conversation_id;
        save();
      }
    }
  };

  let outcome = "done";
  try {
    const done = await client.connect(onEvent);
    if (done.finish_reason === "stopped") outcome = "stopped";
  } catch (err) {
    outcome = err.type === "aborted" ? "stopped" : "error";
    if (outcome === "error") showError(el, err.message);
  } finally {
    state.client = null;
    setBusy(false);
  }
  el.dataset.state = outcome;
  foldThinking(el, thinkingSince === null ? null : (performance.now() - thinkingSince) / 1000);
  paint();
  const meta = document.createElement("div");
  meta.className = "meta";
  const seconds = (performance.now() - (firstTokenAt ?? started)) / 1000;
  const ttft = firstTokenAt === null ? "–" : `${Math.round(firstTokenAt - started)} ms`;
  const rate = tokens > 1 && seconds > 0 ? `${(tokens / seconds).toFixed(1)} tok/s` : "–";
  meta.textContent = `${client.used} · first token ${ttft} · ${tokens} tokens · ${rate}${outcome === "stopped" ? " · stopped" : ""}`;
  el.append(meta);
  $("prompt").focus();
}

async function restore() {
  try {
    state.conversationId = JSON.parse(localStorage.getItem(STORAGE_KEY) || "{}").conversationId || null;
  } catch (_) {
    state.conversationId = null;
  }
  if (!state.conversationId) return;
  const token = $("token").value.trim();
  const response = await fetch(`/api/conversations/${encodeURIComponent(state.conversationId)}`, {
    headers: token ? { Authorization: `Bearer ${token}` } : {},
  });
  if (!response.ok) {
    state.conversationId = null; // expired or deleted: start afresh
    save();
    return;
  }
  const { messages } = await response.json();
  for (const record of messages) {
    if (record.role !== "user" && record.role !== "assistant") continue;
    const { text, images } = contentOf(record.content);
    const el = addMessage(record.role, text, images);
    if (record.role !== "assistant") continue;
    el.dataset.state = record.status;
    if (record.reasoning) {
      addReasoning(el, record.reasoning);
      foldThinking(el, null);
    }
    for (const tool of record.tools || []) toolNote(el, tool, el.querySelector(".body"));
    if (record.error) showError(el, record.error.message);
  }
}

function setupToken() {
  if (!capabilities.auth) return;
  $("token-field").hidden = false;
  $("token").value = localStorage.getItem(TOKEN_KEY) || "";
  $("token").addEventListener("change", () => localStorage.setItem(TOKEN_KEY, $("token").value.trim()));
  if (!$("token").value) {
    $("settings").hidden = false; // the first thing to fill in
    $("token").focus();
  }
}

// ------------------------------------------------------------------ attachments

function showAttachments() {
  const box = $("attachments");
  box.replaceChildren(
    ...state.images.map((image, i) => {
      const item = document.createElement("span");
      item.className = "attachment";
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "remove";
      remove.textContent = "×";
      remove.title = "Remove this image";
      remove.addEventListener("click", () => {
        state.images.splice(i, 1);
        showAttachments();
      });
      item.append(thumbnail(image.url), remove);
      return item;
    }),
  );
  box.hidden = state.images.length === 0 && !box.querySelector(".note");
}

function attachmentNote(text) {
  const note = document.createElement("span");
  note.className = "note";
  note.setAttribute("role", "status");
  note.textContent = text;
  $("attachments").append(note);
  $("attachments").hidden = false;
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function attach(files) {
  showAttachments(); // clears an earlier note
  for (const file of files) {
    if (!IMAGE_TYPES.includes(file.type)) attachmentNote(`${file.name || "that file"}: only PNG, JPEG, GIF or WebP`);
    else if (file.size > MAX_IMAGE_BYTES) attachmentNote(`${file.name || "that image"} is over 5 MB`);
    else if (state.images.length >= MAX_IMAGES) attachmentNote(`at most ${MAX_IMAGES} images a message`);
    else {
      state.images.push({ type: file.type, url: await readAsDataUrl(file) });
      const notes = [...$("attachments").querySelectorAll(".note")];
      showAttachments();
      $("attachments").append(...notes);
    }
  }
}

fillPickers();
setupToken();
restore();

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const prompt = $("prompt").value.trim();
  if ((!prompt && !state.images.length) || state.client) return;
  const images = state.images;
  $("prompt").value = "";
  state.images = [];
  showAttachments();
  send(prompt, images);
});
$("attach").addEventListener("click", () => $("image-input").click());
$("image-input").addEventListener("change", async () => {
  await attach([...$("image-input").files]);
  $("image-input").value = "";
});
$("prompt").addEventListener("paste", (e) => {
  const files = [...(e.clipboardData?.files || [])];
  if (files.length) {
    e.preventDefault();
    attach(files);
  }
});
for (const target of [$("composer"), $("messages")]) {
  target.addEventListener("dragover", (e) => {
    if ([...(e.dataTransfer?.types || [])].includes("Files")) e.preventDefault(); // allow the drop
  });
  target.addEventListener("drop", (e) => {
    const files = [...(e.dataTransfer?.files || [])];
    if (!files.length) return;
    e.preventDefault();
    attach(files);
  });
}
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => state.client?.abort());
$("new-chat").addEventListener("click", () => {
  state.client?.abort();
  state.conversationId = null;
  save();
  $("messages").replaceChildren();
});
$("toggle-settings").addEventListener("click", () => {
  const panel = $("settings");
  panel.hidden = !panel.hidden;
  $("toggle-settings").setAttribute("aria-expanded", String(!panel.hidden));
});
