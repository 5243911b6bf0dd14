// Building DOM nodes without ever parsing HTML.
//
// Everything the server says (reasons, intent reasons, who, agent names) can contain
// anything an operator typed, so no string is ever given to innerHTML: children that are
// strings become text nodes, attributes are set one by one. The Content-Security-Policy
// forbids inline styles, so nothing here sets a style attribute either; looks come from
// classes in style.css and geometry from SVG attributes.

const SVG_NS = "http://www.w3.org/2000/svg";

function build(node, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      node.addEventListener(name.slice(2), value);
    } else if (name === "style") {
      throw new Error("no style attributes: the CSP forbids them");
    } else {
      node.setAttribute(name, value === true ? "" : String(value));
    }
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** An HTML element: el("td", {class: "x"}, "text", otherNode). Strings are text, never markup. */
export function el(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** An SVG element, the same way. */
export function svg(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

/** Replace every child of `node` (by id or node) with `children`. */
export function fill(node, ...children) {
  const target = typeof node === "string" ? document.getElementById(node) : node;
  target.replaceChildren();
  return build(target, {}, children);
}

export function $(id) {
  return document.getElementById(id);
}

/** "4.2 s", "3 min", "2 h": how long, for people. */
export function duration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "?";
  const s = Math.max(0, seconds);
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 120) return `${Math.round(s)} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  return `${Math.round(s / 3600)} h`;
}

/** A Unix time as local hh:mm:ss (the date too when it is not today). */
export function clock(unix) {
  if (!unix) return "?";
  const d = new Date(unix * 1000);
  const sameDay = d.toDateString() === new Date().toDateString();
  const time = d.toLocaleTimeString([], { hour12: false });
  return sameDay ? time : `${d.toLocaleDateString()} ${time}`;
}

export function percent(fraction) {
  return `${Math.round(fraction * 1000) / 10}%`;
}
