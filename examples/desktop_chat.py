"""A desktop chat window on gptedge's Python API: copy it into your app.

    python examples/desktop_chat.py BUNDLE            # the window
    python examples/desktop_chat.py --selftest BUNDLE # no window: print the greedy answer as JSON, exit 0

What it shows an app developer:
- the model loads once, off the UI thread (a large bundle takes seconds; the window stays responsive);
- an answer streams from a worker thread into the window. Tk is not thread-safe, so the worker only puts
  pieces on a queue and the UI thread drains it every 30 ms (`root.after`): the one safe pattern;
- Stop sets a `CancelToken`; the stream ends at its next token and the partial answer stays;
- the bundle's chat template renders the conversation, and the oldest turns are dropped to fit the context;
- tokens/s of each answer in the status line, from the result's own timings.

Only `gptedge.runtime` is imported (numpy, onnxruntime, tokenizers, jinja2 for templates), so a frozen
app carries no torch or onnx: `pyinstaller examples/desktop_chat.spec` builds it (README: "Embedding gptedge").
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
from pathlib import Path

from gptedge.errors import GptEdgeError
from gptedge.runtime import CancelToken, Model
from gptedge.runtime.chat import fit_messages, template_for

SELFTEST_PROMPT = "def add(a, b):\n    return"
POLL_MS = 30


class ChatSession:
    """The conversation and its sampling settings, with no UI: what the window (and the self-test) drive."""

    def __init__(self, model: Model, max_new_tokens: int, temperature: float) -> None:
        self.model = model
        self.template = template_for(model)
        self.params = model.sampling_params(max_new_tokens=max_new_tokens, temperature=temperature,
                                            stop_strings=self.template.stop_strings)
        self.messages: list[dict[str, str]] = []

    def stream(self, message: str, cancel: CancelToken):
        """Add the user's message and return the answer's stream (iterate it for text; `.result` at the end)."""
        self.messages.append({"role": "user", "content": message})
        prompt = fit_messages(self.model, self.template, self.messages, self.params.max_new_tokens)
        return self.model.stream(prompt, self.params, cancel=cancel)

    def answered(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text.strip()})


class ChatWindow:
    """Transcript, prompt line, Send and Stop, a status line. Every widget is touched on the UI thread only."""

    def __init__(self, root, bundle: Path, max_new_tokens: int, temperature: float, threads: int | None) -> None:
        import tkinter as tk
        from tkinter import scrolledtext

        self.root, self.session = root, None
        self.events: queue.Queue = queue.Queue()  # worker threads -> UI thread: (kind, value)
        self.cancel: CancelToken | None = None
        self.answer: list[str] = []
        root.title(f"gptedge chat: {bundle.name}")
        root.geometry("720x480")
        # Bottom first: the status line and the prompt bar keep their height when the window shrinks.
        self.status = tk.Label(root, anchor="w", text=f"loading {bundle} ...")
        self.status.pack(side="bottom", fill="x", padx=8, pady=(4, 8))
        bar = tk.Frame(root)
        bar.pack(side="bottom", fill="x", padx=8)
        self.transcript = scrolledtext.ScrolledText(root, wrap="word", state="disabled", font=("TkFixedFont", 11))
        self.transcript.tag_configure("you", foreground="#1f4e9c")
        self.transcript.pack(side="top", fill="both", expand=True, padx=8, pady=(8, 4))
        self.entry = tk.Entry(bar, font=("TkDefaultFont", 11))
        self.entry.pack(side="left", fill="x", expand=True)
        self.entry.bind("<Return>", lambda _: self.send())
        self.send_button = tk.Button(bar, text="Send", command=self.send, state="disabled")
        self.send_button.pack(side="left", padx=(6, 0))
        self.stop_button = tk.Button(bar, text="Stop", command=self.stop, state="disabled")
        self.stop_button.pack(side="left", padx=(6, 0))
        self.on_answer = None  # called with the finished answer's text (the --prompt mode quits from it)
        self.on_error = None  # called with an error's message
        threading.Thread(target=self._load, args=(bundle, max_new_tokens, temperature, threads), daemon=True).start()
        root.after(POLL_MS, self._poll)

    def _load(self, bundle: Path, max_new_tokens: int, temperature: float, threads: int | None) -> None:
        try:
            model = Model.load(bundle, threads=threads)
            self.events.put(("loaded", ChatSession(model, max_new_tokens, temperature)))
        except Exception as exc:  # a worker's exception would vanish with its thread: show every one
            self.events.put(("error", _message(exc)))

    def send(self, message: str | None = None) -> None:
        message = (message if message is not None else self.entry.get()).strip()
        if not message or self.session is None or self.cancel is not None:
            return
        self.entry.delete(0, "end")
        self._write(f"You: {message}\n", "you")
        self._write("Model: ")
        self.cancel, self.answer = CancelToken(), []
        self.send_button.configure(state="disabled")
        self.stop_button.configure(state="normal")
        self.status.configure(text="generating ...")
        threading.Thread(target=self._generate, args=(message, self.cancel), daemon=True).start()

    def _generate(self, message: str, cancel: CancelToken) -> None:
        try:
            stream = self.session.stream(message, cancel)
            for piece in stream:
                self.events.put(("piece", piece))
            self.events.put(("done", stream.result))
        except Exception as exc:
            self.events.put(("error", _message(exc)))

    def stop(self) -> None:
        if self.cancel is not None:
            self.cancel.cancel()

    def _poll(self) -> None:
        """Drain the workers' queue on the UI thread, then look again in POLL_MS."""
        while True:
            try:
                kind, value = self.events.get_nowait()
            except queue.Empty:
                break
            if kind == "loaded":
                self.session = value
                self.send_button.configure(state="normal")
                self.status.configure(text=f"ready: {value.model.provider}, context {value.model.context_length}")
            elif kind == "piece":
                self.answer.append(value)
                self._write(value)
            elif kind == "done":
                self._finish(value)
            elif kind == "error":
                self._write(f"\n[error] {value}\n")
                self.status.configure(text="error (see the transcript)")
                self.cancel = None
                self.stop_button.configure(state="disabled")
                self.send_button.configure(state="normal" if self.session else "disabled")
                if self.on_error:
                    self.on_error(value)
        self.root.after(POLL_MS, self._poll)

    def _finish(self, result) -> None:
        text = "".join(self.answer)
        self.session.answered(text)
        self._write(" [stopped]\n\n" if result.finish_reason == "cancelled" else "\n\n")
        t = result.timings
        self.status.configure(text=f"{t.generated_tokens} tokens, {t.decode_tokens_per_s:.1f} tokens/s, "
                                   f"first token {1000 * t.ttft_s:.0f} ms, finish: {result.finish_reason}")
        self.cancel = None
        self.send_button.configure(state="normal")
        self.stop_button.configure(state="disabled")
        if self.on_answer:
            self.on_answer(text)

    def _write(self, text: str, tag: str | None = None) -> None:
        self.transcript.configure(state="normal")
        self.transcript.insert("end", text, (tag,) if tag else ())
        self.transcript.see("end")
        self.transcript.configure(state="disabled")


def _message(exc: Exception) -> str:
    """gptedge's errors say what to do; anything else is a bug worth its type name in the report."""
    return str(exc) if isinstance(exc, GptEdgeError) else f"unexpected {type(exc).__name__}: {exc}"


def selftest(bundle: Path, max_new_tokens: int) -> int:
    """No window: stream a greedy answer to SELFTEST_PROMPT and print it with the API's own generate() as JSON
    (ASCII, so any console code page carries it). Proves a frozen app can load and run the model."""
    model = Model.load(bundle, threads=1)
    streamed = "".join(model.stream(SELFTEST_PROMPT, max_new_tokens=max_new_tokens, temperature=0.0))
    direct = model.generate(SELFTEST_PROMPT, max_new_tokens=max_new_tokens, temperature=0.0).text
    print(json.dumps({"text": streamed, "same_as_generate": streamed == direct, "provider": model.provider}))
    return 0 if streamed == direct else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A desktop chat window on a gptedge bundle.")
    parser.add_argument("bundle", type=Path, nargs="?", help="bundle folder (gptedge export / quantize)")
    parser.add_argument("--selftest", type=Path, metavar="BUNDLE", help="no window: print a greedy answer, exit")
    parser.add_argument("--prompt", help="send this message as soon as the model is loaded; print the answer and "
                                         "the window's transcript as JSON, then close")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        if args.selftest:
            return selftest(args.selftest, min(args.max_new_tokens, 32))
        if args.bundle is None:
            parser.error("pass a bundle folder (or --selftest BUNDLE)")
        return run_window(args)
    except GptEdgeError as exc:
        print(f"desktop_chat: {exc}", file=sys.stderr)
        return exc.exit_code


def run_window(args: argparse.Namespace) -> int:
    import tkinter as tk

    try:
        root = tk.Tk()
    except tk.TclError as exc:
        print(f"desktop_chat: no display to open a window on ({exc}); use --selftest BUNDLE without one",
              file=sys.stderr)
        return 2
    window = ChatWindow(root, args.bundle, args.max_new_tokens, args.temperature, args.threads)
    if args.prompt:
        def report(answer: str) -> None:
            root.update_idletasks()  # draw the last pieces before anyone looks (the test's screenshot)
            transcript = window.transcript.get("1.0", "end")
            print(json.dumps({"answer": answer, "transcript": transcript}), flush=True)
            root.after(1500, root.destroy)  # time for a screenshot of the finished window

        def failed(message: str) -> None:
            print(json.dumps({"error": message}), flush=True)
            root.after(100, root.destroy)

        window.on_answer, window.on_error = report, failed
        root.after(POLL_MS, lambda: _send_when_ready(root, window, args.prompt))
    root.mainloop()
    return 0


def _send_when_ready(root, window: ChatWindow, prompt: str) -> None:
    if window.session is None:
        root.after(POLL_MS, lambda: _send_when_ready(root, window, prompt))
    else:
        window.entry.insert(0, prompt)
        window.send_button.invoke()  # the same path as a click


if __name__ == "__main__":
    sys.exit(main())
