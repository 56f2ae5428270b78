"""Prompts of mixed lengths and scripts shared by the engine tests."""

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "中国的首都是哪里？请用一句话回答。",
    "Emoji test 🚀🔥 — what do these mean? 🎉",
    "def fibonacci(n):\n    ",
    "List three colours:",
    "A long prompt. " * 40,
    "Translate to French: The weather is lovely today and we are going to the beach.",
    "1, 2, 3, 4, 5,",
    "Ünïcödé àccents and naïve café résumé",
    "今日は良い天気ですね。散歩に行きましょう。",
    "Q: Why is the sky blue?\nA:",
]
