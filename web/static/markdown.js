// A small Markdown renderer for streamed answers.
//
// Safety: every piece of source text is HTML-escaped before any tag is
// added, and the only tags added are the fixed ones below; links keep only
// http(s) URLs. Supported: ATX headings, paragraphs, **bold**, *italic*,
// `inline code`, fenced code blocks, - / 1. lists, > quotes, rules, links.
// While an answer streams, an unclosed fence renders as an open code block.
"use strict";

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (ch) => ESCAPES[ch]);
}

// Inline markup of one escaped line. Code spans are cut out first so that
// their contents are never read as emphasis or links.
function renderInline(source) {
  const codeSpans = [];
  let text = escapeHtml(source).replace(/`([^`]+)`/g, (match, code) => {
    codeSpans.push(`<code>${code}</code>`);
    return `\u0000${codeSpans.length - 1}\u0000`;
  });

  text = text.replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g,
    (match, label, url) => `<a href="${url}" target="_blank" rel="noopener noreferrer">${label}</a>`);
  text = text.replace(/\*\*(?=\S)(.+?)\*\*/g, "<strong>$1</strong>");
  text = text.replace(/__(?=\S)(.+?)__/g, "<strong>$1</strong>");
  text = text.replace(/(^|[^*\w])\*(?=\S)([^*]+?)\*(?!\*)/g, "$1<em>$2</em>");
  text = text.replace(/(^|[^_\w])_(?=\S)([^_]+?)_(?![_\w])/g, "$1<em>$2</em>");

  return text.replace(/\u0000(\d+)\u0000/g, (match, index) => codeSpans[Number(index)]);
}

const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const BULLET_ITEM = /^\s*[-*+]\s+(.*)$/;
const ORDERED_ITEM = /^\s*(\d{1,9})[.)]\s+(.*)$/;
const QUOTE = /^\s{0,3}>\s?(.*)$/;
const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;

function renderCodeBlock(lines, start) {
  const [, marker, language] = lines[start].match(FENCE);
  const body = [];
  let index = start + 1;
  let isClosed = false;
  for (; index < lines.length; index++) {
    const trimmed = lines[index].trim();
    if (trimmed.startsWith(marker[0].repeat(marker.length)) && /^([`~])\1*$/.test(trimmed)) {
      isClosed = true;
      index++;
      break;
    }
    body.push(lines[index]);
  }
  const languageClass = language ? ` class="language-${escapeHtml(language)}"` : "";
  const openClass = isClosed ? "" : ' class="open"';
  return { html: `<pre${openClass}><code${languageClass}>${escapeHtml(body.join("\n"))}</code></pre>`, next: index };
}

function renderList(lines, start) {
  const isOrdered = ORDERED_ITEM.test(lines[start]) && !BULLET_ITEM.test(lines[start]);
  const pattern = isOrdered ? ORDERED_ITEM : BULLET_ITEM;
  const items = [];
  let index = start;
  for (; index < lines.length; index++) {
    const match = lines[index].match(pattern);
    if (match) {
      items.push(isOrdered ? match[2] : match[1]);
    } else if (items.length && /^\s{2,}\S/.test(lines[index])) {
      items[items.length - 1] += "\n" + lines[index].trim(); // continuation line of the item
    } else {
      break;
    }
  }
  const tag = isOrdered ? "ol" : "ul";
  const first = isOrdered ? Number(lines[start].match(ORDERED_ITEM)[1]) : 1;
  const startAttr = isOrdered && first !== 1 ? ` start="${first}"` : "";
  const body = items.map((item) => `<li>${item.split("\n").map(renderInline).join("<br>")}</li>`).join("");
  return { html: `<${tag}${startAttr}>${body}</${tag}>`, next: index };
}

function renderQuote(lines, start) {
  const body = [];
  let index = start;
  for (; index < lines.length && QUOTE.test(lines[index]); index++) body.push(lines[index].match(QUOTE)[1]);
  return { html: `<blockquote>${renderBlocks(body.join("\n")).join("")}</blockquote>`, next: index };
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || BULLET_ITEM.test(line) || ORDERED_ITEM.test(line)
    || QUOTE.test(line) || RULE.test(line);
}

function renderParagraph(lines, start) {
  const body = [];
  let index = start;
  for (; index < lines.length && lines[index].trim() && (index === start || !startsBlock(lines[index])); index++) {
    body.push(lines[index]);
  }
  return { html: `<p>${body.map(renderInline).join("<br>")}</p>`, next: index };
}

// Render Markdown to a list of HTML strings, one per top-level block, so a
// caller can leave the finished blocks of a streaming answer untouched.
function renderBlocks(source) {
  const lines = source.replace(/\u0000/g, "").replace(/\r\n?/g, "\n").split("\n");
  const blocks = [];
  let index = 0;
  while (index < lines.length) {
    const line = lines[index];
    let block;
    if (!line.trim()) {
      index++;
      continue;
    } else if (FENCE.test(line)) {
      block = renderCodeBlock(lines, index);
    } else if (HEADING.test(line)) {
      const [, hashes, text] = line.match(HEADING);
      block = { html: `<h${hashes.length}>${renderInline(text)}</h${hashes.length}>`, next: index + 1 };
    } else if (RULE.test(line)) {
      block = { html: "<hr>", next: index + 1 };
    } else if (BULLET_ITEM.test(line) || ORDERED_ITEM.test(line)) {
      block = renderList(lines, index);
    } else if (QUOTE.test(line)) {
      block = renderQuote(lines, index);
    } else {
      block = renderParagraph(lines, index);
    }
    blocks.push(block.html);
    index = block.next;
  }
  return blocks;
}

function renderMarkdown(source) {
  return renderBlocks(source).join("");
}

// Update `container` to the rendered blocks of `source`, replacing only the
// blocks whose HTML changed. During streaming that is usually the last
// block, so earlier text neither flickers nor loses its selection.
const renderedHtml = new WeakMap(); // block element -> the HTML it was built from

function patchMarkdown(container, source) {
  const blocks = renderBlocks(source);
  const children = Array.from(container.children);
  blocks.forEach((html, i) => {
    if (children[i] && renderedHtml.get(children[i]) === html) return;
    const template = document.createElement("template");
    template.innerHTML = html;
    const element = template.content.firstElementChild;
    renderedHtml.set(element, html);
    if (children[i]) children[i].replaceWith(element);
    else container.appendChild(element);
  });
  for (const extra of children.slice(blocks.length)) extra.remove();
}

if (typeof module !== "undefined") module.exports = { escapeHtml, renderInline, renderBlocks, renderMarkdown };
