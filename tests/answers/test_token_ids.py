from clip_runner.answers.token_ids import PromptTokenizer

# Over the tiny model's 77-token limit: 5 tokens a word or more in its small vocabulary.
LONG_PROMPT = " ".join(f"word{number}" for number in range(60))
PROMPTS = [
    "a photo of a cat",
    "",
    "   ",
    "A Photo Of A CAT!!",
    "café, naïve, 日本の猫, 🐈‍⬛",
    "tab\tand\nnew line",
    "<|endoftext|> inside a prompt",
    "it's a dog's life",
    LONG_PROMPT,
]


def test_ids_equal_the_tokenizers_own_call_untruncated(tiny_clip):
    tokenizer = tiny_clip.processor.tokenizer
    ids = PromptTokenizer(tokenizer.backend_tokenizer.to_str(), 64, 77)(PROMPTS)
    assert [list(prompt_ids) for prompt_ids in ids] == tokenizer(PROMPTS)["input_ids"]
    assert len(ids[-1]) > tokenizer.model_max_length  # counted whole, so refused as too long


def test_truncation_set_on_the_wrapped_tokenizer_does_not_cut_the_count(tiny_clip):
    """transformers leaves a truncating call's setting on its Rust tokenizer until the next
    call (and a saved tokenizer.json can carry one): the copy must not inherit it."""
    tokenizer = tiny_clip.processor.tokenizer
    cut = tokenizer(LONG_PROMPT, truncation=True, max_length=77)["input_ids"]
    assert len(cut) == 77
    # The runner's JSON, taken while truncation is set (as after its warm-up's call)
    prompt_tokenizer = PromptTokenizer(tokenizer.backend_tokenizer.to_str(), 64, 77)
    assert len(prompt_tokenizer([LONG_PROMPT])[0]) == len(tokenizer(LONG_PROMPT)["input_ids"]) > 77
    tokenizer(LONG_PROMPT, truncation=True, max_length=77)
    assert len(prompt_tokenizer(["another " + LONG_PROMPT])[0]) > 77


def test_ids_are_memoised_up_to_the_cache_size(tiny_clip):
    json = tiny_clip.processor.tokenizer.backend_tokenizer.to_str()
    prompt_tokenizer = PromptTokenizer(json, 2, 77)
    first = prompt_tokenizer(["a cat"])[0]
    assert prompt_tokenizer(["a cat"])[0] is first
    prompt_tokenizer(["a dog", "a bird"])  # "a cat" is now the least recently used: evicted
    again = prompt_tokenizer(["a cat"])[0]
    assert again is not first
    assert again == first


def test_prompts_over_the_token_limit_and_a_zero_size_memoise_nothing(tiny_clip):
    """A refused prompt is not asked for again: it had stayed in the memo (up to 2,300 ids a
    prompt, some 230 MB of an API worker), even with CLIP_TEXT_CACHE_SIZE=0."""
    json = tiny_clip.processor.tokenizer.backend_tokenizer.to_str()
    prompt_tokenizer = PromptTokenizer(json, 64, 77)
    long_ids = prompt_tokenizer([LONG_PROMPT])[0]
    assert len(long_ids) > 77 and prompt_tokenizer([LONG_PROMPT])[0] is not long_ids
    short_ids = prompt_tokenizer(["a cat"])[0]
    assert prompt_tokenizer(["a cat"])[0] is short_ids
    turned_off = PromptTokenizer(json, 0, 77)
    assert turned_off(["a cat"])[0] is not turned_off(["a cat"])[0]
