"""Sampling: the per-sequence state machine, logit processing, streaming generation and rendering.

params.py    SamplingParams: every sampling option, declared once (default, range, help, group)
prompt.py    what a prompt is: text (str) and images (interleaf.Image, PIL, ImageCodes)
events.py    what a stream yields (TextDelta, ImageStart, ImageProgress, ImageDone, Done, Document)
state.py     SequenceState: which ids the next token may take, what a token does
logits.py    modality mask table, guidance, repetition penalty, top-k / top-p, seeded draws
generate.py  Request, stream / generate / stream_requests (prefill + decode loop)
speculative.py  Jacobi drafts of image codes verified to sample exactly (image_parallel K)
render.py    document.md / document.html / PNGs, written atomically
"""
