"""``generate``'s text output: each request's text on stdout as it is generated, in input order,
a line at a time, under a progress bar on stderr."""

from __future__ import annotations

import sys


class TextStream:
    """Text on stdout in input order, a line at a time, with a tqdm bar on stderr.

    Whole lines only, written with the bar cleared, so the bar redraws below the text instead
    of through it. The first unfinished request streams; later ones buffer until it is done.
    """

    def __init__(self, tokenizer, prompts: list[list[int]], *, num_samples: int, total: int):
        from tqdm import tqdm

        from workbench.checkpoints import StreamDecoder

        self.tokenizer = tokenizer
        self.bar = tqdm(total=total, unit="tok", desc="generating", file=sys.stderr, dynamic_ncols=True)
        # one stream per (request, sample), written in that order
        streams = [(request, sample) for request in range(len(prompts)) for sample in range(num_samples)]
        self.index = {stream: i for i, stream in enumerate(streams)}
        numbered = num_samples > 1  # headers name the sample only when there are several
        self.pending = [self._header(r, s if numbered else None, prompts[r]) for r, s in streams]  # not yet written
        self.decoders = [StreamDecoder(tokenizer) if tokenizer else None for _ in streams]
        self.finished = [False] * len(streams)
        self.head = 0  # the stream whose text is being written

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _header(self, index: int, sample: int | None, prompt: list[int]) -> str:
        shown = self.tokenizer.decode(prompt) if self.tokenizer else " ".join(map(str, prompt)) + " ->"
        return f"=== request {index}{'' if sample is None else f', sample {sample}'} ===\n{shown}"

    def token(self, request, token: int, sample: int = 0) -> None:
        index = self.index[request.id, sample]
        decoder = self.decoders[index]
        self.pending[index] += decoder.push(token) if decoder else f" {token}"
        self.bar.update(1)
        self._write()

    def finish(self, completion) -> None:
        index = self.index[completion.request.id, completion.sample]
        decoder = self.decoders[index]
        tail = decoder.flush() if decoder else ""
        self.pending[index] += f"{tail}\n[{len(completion.tokens)} tokens, {completion.finish_reason}]\n"
        self.finished[index] = True
        self._write()

    def _write(self) -> None:
        while self.head < len(self.pending):
            text, done = self.pending[self.head], self.finished[self.head]
            cut = len(text) if done else text.rfind("\n") + 1
            if cut:
                with self.bar.external_write_mode(file=sys.stdout):
                    sys.stdout.write(text[:cut])
                    sys.stdout.flush()
                self.pending[self.head] = text[cut:]
            if not done:
                return
            self.head += 1

    def close(self) -> None:
        self.bar.close()
