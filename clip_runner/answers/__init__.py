"""Each API's flow from validated fields to its answer: runner calls, the zero-shot math, prompt
ensembling, the Hugging Face toolkit's shape, the text cache, the embedding format."""
