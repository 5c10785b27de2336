"""Intent routing: pick a route for the newest user message by embedding similarity.

Each route has labelled example utterances in English and Chinese. A
message's score for a route is the mean cosine similarity of its three
nearest examples of that route. The best route wins if its score reaches
that route's minimum, and otherwise the message goes to "chat". A greeting gets a rule reply without
the model, so its minimum is stricter than the others: a wrong greeting
answers a real question with "Hello!".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from pipeline.embeddings import Embedder
from pipeline.job import ROUTES

__all__ = ["ROUTES", "RouteDecision", "IntentRouter", "detect_language", "greeting_reply", "DEFAULT_EXAMPLES"]

# Scores are means of cosine similarities in [-1, 1]. Measured on the
# utterances of tests/test_intent.py, none of them an example: each winning
# route leads the runner-up by at least 0.2, and every score is at least 0.04
# away from its route's minimum. Gibberish such as "asdkjh qwe" scores 0.51
# against the greetings, hence the stricter greeting minimum.
MIN_SCORE = {"greeting": 0.6, "code": 0.3, "knowledge": 0.3, "task": 0.3, "chat": 0.0}
NUM_NEAREST = 3

DEFAULT_EXAMPLES: dict[str, list[str]] = {
    "greeting": [
        "hey", "hello", "hi there", "good morning", "good evening", "hey, how are you?", "greetings!",
        "howdy", "nice to meet you",
        "您好", "嗨", "哈喽", "晚上好", "下午好", "大家好", "你好呀", "最近怎么样？",
    ],
    "code": [
        "write a function in javascript that checks if a number is prime", "fix this bug in my python code",
        "how do I sort a list of dictionaries by key in python?", "implement binary search in C++",
        "write a SQL query that counts orders per customer", "explain what this regex does",
        "refactor this class to use dataclasses",
        "用Java实现一个链表", "帮我写一个函数计算斐波那契数列", "这段代码为什么报错", "如何在JavaScript中深拷贝一个对象",
        "写一个Go程序读取文件", "用C语言实现一个栈", "写一个正则表达式匹配邮箱地址", "解释一下这段SQL",
    ],
    "knowledge": [
        "what is your return policy?", "according to the manual, how do I reset the device?",
        "how long is the warranty on this product?", "what does the user guide say about shipping times?",
        "which payment methods do you support?", "where can I find the installation instructions?",
        "退货政策是怎样的", "说明书里怎么说重置设备", "你们支持哪些付款方式", "文档中关于配送时间的说明是什么", "如何申请退款",
    ],
    "task": [
        "what is 15% of 240?", "calculate 128 divided by 4", "compute the square root of 144",
        "how much is 3 to the power of 5?", "add 456 and 789", "what is 1024 minus 37 times 3?",
        "convert 25 multiplied by 17 into a number", "what is 12 * 7?", "19 + 23 = ?", "(5 + 3) / 2",
        "计算 45 乘以 12", "100 除以 8 等于多少", "帮我算一下 3.5 加 7.25", "求 81 的平方根", "123 减去 45 是多少",
    ],
    "chat": [
        "tell me a story about a dragon", "what's your favourite movie?", "write a poem about autumn",
        "I feel a bit sad today", "do you like music?", "give me some advice on staying motivated",
        "thank you so much", "thanks, that helps", "what do you think about the weather?",
        "讲个笑话", "给我讲一个关于小狗的故事", "你喜欢什么颜色", "写一首关于春天的诗", "我今天心情不好", "谢谢", "非常感谢",
        "你觉得人工智能会取代人类吗",
    ],
}


@dataclass
class RouteDecision:
    route: str
    score: float  # the chosen route's mean top-3 cosine similarity
    language: str  # "zh" or "en"
    scores: dict[str, float] = field(default_factory=dict)  # every route's score, for the job timeline


class IntentRouter:
    """Route a message to one of ROUTES by similarity to labelled examples."""

    def __init__(self, embedder: Embedder, examples: dict[str, list[str]] | None = None) -> None:
        examples = DEFAULT_EXAMPLES if examples is None else examples
        unknown = sorted(set(examples) - set(ROUTES))
        if unknown:
            raise ValueError(f"intent examples name unknown routes {unknown}; use routes from {list(ROUTES)}")
        empty = sorted(route for route, texts in examples.items() if not texts)
        if empty:
            raise ValueError(f"intent examples for routes {empty} are empty; give each route at least one example")

        self._embedder = embedder
        # Route -> [num_examples, 512] unit vectors, embedded once.
        self._example_vectors = {route: embedder.embed(list(texts)) for route, texts in examples.items()}

    def route(self, text: str) -> RouteDecision:
        language = detect_language(text)
        if not text.strip():
            return RouteDecision("chat", 0.0, language, {})

        query = self._embedder.embed([text])[0]  # [512]
        scores = {route: _mean_nearest(vectors @ query) for route, vectors in self._example_vectors.items()}
        best = max(scores, key=scores.get)
        if scores[best] < MIN_SCORE.get(best, 0.0):
            best = "chat"
        return RouteDecision(best, scores.get(best, 0.0), language, scores)


def _mean_nearest(similarities: np.ndarray) -> float:
    nearest = np.sort(similarities)[::-1][:NUM_NEAREST]
    return round(float(nearest.mean()), 4)


# CJK Unified Ideographs, extension A and the compatibility block.
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_WORD = re.compile(r"[A-Za-z]+")


def detect_language(text: str) -> str:
    """Return "zh" when Chinese characters dominate, else "en".

    One Chinese character is compared with one Latin word, since a
    character carries about as much as a word does: "用Python写一个快速排序"
    has 8 characters against 1 word, so it is Chinese.
    """
    num_cjk = len(_CJK.findall(text))
    num_latin_words = len(_LATIN_WORD.findall(text))
    return "zh" if num_cjk > 0 and num_cjk >= num_latin_words else "en"


_REPLIES = {
    "en": [
        ("morning", "Good morning! How can I help you today?"),
        ("afternoon", "Good afternoon! How can I help you today?"),
        ("evening", "Good evening! How can I help you today?"),
    ],
    "zh": [
        ("早", "早上好！有什么可以帮你的吗？"),
        ("下午", "下午好！有什么可以帮你的吗？"),
        ("晚", "晚上好！有什么可以帮你的吗？"),
    ],
}
_DEFAULT_REPLY = {"en": "Hello! How can I help you today?", "zh": "你好！有什么可以帮你的吗？"}


def greeting_reply(text: str, language: str) -> str:
    """Return a rule reply to a greeting, matching its time of day, in Chinese for "zh" and English otherwise."""
    language = "zh" if language == "zh" else "en"
    lowered = text.lower()
    for keyword, reply in _REPLIES[language]:
        if keyword in lowered:
            return reply
    return _DEFAULT_REPLY[language]
