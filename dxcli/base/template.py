"""The one conversation template (Vicuna v1) and the default question, used everywhere."""

from __future__ import annotations

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_TOKEN = "<image>"
EOS = "</s>"
DEFAULT_QUESTION = (
    "Analyze this image for any signs of digital manipulation or artificial generation and "
    "determine if it is real or fake. Provide your reasoning first, then conclude with "
    "'### Answer: real' or '### Answer: fake'."
)


# The same conversation as `prompt`, as a Jinja chat template for the saved processor, so plain
# transformers builds dx's prompt with `processor.apply_chat_template(messages, add_generation_prompt=True)`
# (messages: [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]).
CHAT_TEMPLATE = (
    SYSTEM +  # plain text: Jinja passes it through as it is
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %} USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}" + IMAGE_TOKEN + "\n{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}{% endif %}"
    "{% elif message['role'] == 'assistant' %} ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}{% endif %}"
    + EOS + "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def user_text(question: str) -> str:
    """The human turn: `<image>` first, then the question (LLaVA convention)."""
    question = question.replace(IMAGE_TOKEN, "").strip()
    return f"{IMAGE_TOKEN}\n{question}"


def prompt(question: str) -> str:
    """Everything up to and including `ASSISTANT:`; the model continues from here."""
    return f"{SYSTEM} USER: {user_text(question)} ASSISTANT:"


def split_conversation(conversations: list[dict]) -> tuple[str, str]:
    """(question, answer) from a LLaVA record's first human/gpt turns."""
    human = next((turn["value"] for turn in conversations if turn.get("from") == "human"), None)
    gpt = next((turn["value"] for turn in conversations if turn.get("from") == "gpt"), None)
    if human is None or gpt is None:
        raise ValueError("conversation needs a 'human' and a 'gpt' turn")
    return human.replace(IMAGE_TOKEN, "").strip(), gpt
