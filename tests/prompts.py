"""Short sentiment prompts that share a demonstration prefix, for the decomposition tests on tiny models."""

PREFIX = "review : great film sentiment : positive review : awful plot sentiment : negative review : "
SENTIMENT_PROMPTS = [
    PREFIX + "good fun sentiment :",
    PREFIX + "dull sentiment :",
    PREFIX + "the movie was very boring and the acting was bad sentiment :",
    PREFIX + "loved it sentiment :",
    PREFIX + "a film sentiment :",
    PREFIX + "not fun sentiment :",
]
