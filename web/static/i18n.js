// UI strings in English and Simplified Chinese, chosen from navigator.language.
"use strict";

const STRINGS = {
  en: {
    apiKey: "API key",
    apiKeyPlaceholder: "optional",
    newChat: "New chat",
    emptyHint: "Ask anything. Answers stream in as they are generated.",
    inputPlaceholder: "Message chatpipe (Enter to send, Shift+Enter for a new line)",
    inputLabel: "Message",
    send: "Send",
    stop: "Stop",
    you: "You",
    assistant: "Assistant",
    stopped: "Stopped.",
    errorPrefix: "Error",
    connectionLost: "Connection lost; reconnecting…",
    retryAfter: "retry in {s} s",
    route: "route",
    model: "model",
    ttft: "first token",
    tokensPerSecond: "tokens/s",
    tokens: "tokens",
    stageNames: { context: "context", intent: "intent", retrieval: "retrieval", inference: "inference", tools: "tools", detokenize: "detokenize" },
    tool: "tool",
  },
  zh: {
    apiKey: "API 密钥",
    apiKeyPlaceholder: "可选",
    newChat: "新对话",
    emptyHint: "随便问点什么，回答会边生成边显示。",
    inputPlaceholder: "输入消息（Enter 发送，Shift+Enter 换行）",
    inputLabel: "消息",
    send: "发送",
    stop: "停止",
    you: "你",
    assistant: "助手",
    stopped: "已停止。",
    errorPrefix: "出错",
    connectionLost: "连接中断，正在重连…",
    retryAfter: "{s} 秒后重试",
    route: "路由",
    model: "模型",
    ttft: "首字延迟",
    tokensPerSecond: "词元/秒",
    tokens: "词元",
    stageNames: { context: "上下文", intent: "意图", retrieval: "检索", inference: "推理", tools: "工具", detokenize: "解码" },
    tool: "工具",
  },
};

function pickLanguage(languages) {
  const first = (languages && languages[0]) || "en";
  return first.toLowerCase().startsWith("zh") ? "zh" : "en";
}

const LANGUAGE = pickLanguage(navigator.languages && navigator.languages.length ? navigator.languages : [navigator.language]);

function t(key, values) {
  const text = STRINGS[LANGUAGE][key] ?? STRINGS.en[key] ?? key;
  if (!values) return text;
  return text.replace(/\{(\w+)\}/g, (match, name) => (name in values ? String(values[name]) : match));
}

function stageName(stage) {
  return STRINGS[LANGUAGE].stageNames[stage] || stage;
}

// Fill every element marked with data-i18n (text), data-i18n-placeholder
// or data-i18n-aria-label with the string of the chosen language.
function applyTranslations(root) {
  document.documentElement.lang = LANGUAGE === "zh" ? "zh-CN" : "en";
  for (const el of root.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of root.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
  for (const el of root.querySelectorAll("[data-i18n-aria-label]")) el.setAttribute("aria-label", t(el.dataset.i18nAriaLabel));
}
