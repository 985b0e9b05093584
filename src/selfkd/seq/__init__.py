"""Token-level self-KD for sequence-to-sequence models (PS-KD paper §4.4, machine translation).

* :mod:`selfkd.seq.snapshot` — the previous epoch's model, frozen (PS-KD's p_{t−1} for tokens:
  a per-token bank is impossible at translation scale, so the paper uses the model of the
  previous epoch);
* :mod:`selfkd.seq.objective` — the training objective for any Hugging Face seq2seq model
  (``ce``, ``ls`` on tokens, ``pskd`` on tokens), a loss hook called once per batch;
* :mod:`selfkd.seq.corpus` — word vocabularies, padding/collation, a synthetic parallel corpus;
* :mod:`selfkd.seq.bleu` — greedy decoding and corpus BLEU with sacrebleu;
* :mod:`selfkd.seq.translate` — the config-driven training run (``python -m
  selfkd.seq.translate --config FILE``).

``transformers`` and ``sacrebleu`` are optional (``pip install 'selfkd[seq]'``).
"""
