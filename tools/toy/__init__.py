"""Building blocks of tools/make_toy_family.py, one job per module.

vocab.py    the closed word-level vocabulary and the shared tokenizer
corpus.py   text training data: base pretraining mixture and math word problems
vlm_data.py image + question training examples for the VLM stage
models.py   configs and builders (Llama base, LLaVA around it), processor
train.py    the one training loop (masked next-token loss, AdamW, seeded)
evalset.py  held-out eval suites and the app's sample images
save.py     atomic writing of model folders
"""
