// The DOM helpers of the report and the diff pages, included before each
// page's own script. Every string from the data goes into the page with
// textContent, never as markup.
"use strict";
var SVGNS = "http://www.w3.org/2000/svg";
// An HTML element with attributes and text.
function h(tag, attrs, text) {
  var e = document.createElement(tag);
  if (attrs) for (var k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined && text !== null) e.textContent = text;
  return e;
}
// An SVG element with attributes and text.
function s(tag, attrs, text) {
  var e = document.createElementNS(SVGNS, tag);
  if (attrs) for (var k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined && text !== null) e.textContent = text;
  return e;
}
function tip(el, text) { el.appendChild(s("title", null, text)); return el; }
function clear(el) { while (el.firstChild) el.removeChild(el.firstChild); return el; }
function byId(id) { return document.getElementById(id); }
// Marks the page as failed: data-status="error" on <body>, and why in
// #status ("The report script failed: ...").
function failPage(script, msg) {
  document.body.setAttribute("data-status", "error");
  var st = byId("status");
  if (st) { st.className = "error"; st.textContent = "The " + script + " script failed: " + msg; }
}
