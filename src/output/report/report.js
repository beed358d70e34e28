(function () {
"use strict";
// The DOM helpers (h, s, tip, clear, byId, failPage) are in dom.js.
var body = document.body;
function fail(msg) { failPage("report", msg); }
window.addEventListener("error", function (ev) { fail(String(ev.message)); });
function fmt(v) {
  if (v === null || v === undefined || !isFinite(v)) return "n/a";
  var a = Math.abs(v);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(2);
  return String(+v.toPrecision(4));
}
function vis(t) { return String(t).replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5"); }
var VIRIDIS = [[68,1,84],[59,82,139],[33,145,140],[94,201,98],[253,231,37]];
var RDYLGN = [[215,48,39],[252,141,89],[254,224,139],[145,207,96],[26,152,80]];
var BLUES = [[247,251,255],[198,219,239],[107,174,214],[33,113,181],[8,48,107]];
function ramp(stops, t) {
  if (!(t >= 0)) t = 0;
  if (t > 1) t = 1;
  var x = t * (stops.length - 1), i = Math.min(stops.length - 2, Math.floor(x)), f = x - i;
  var a = stops[i], b = stops[i + 1], c = [];
  for (var k = 0; k < 3; k++) c.push(Math.round(a[k] + (b[k] - a[k]) * f));
  return "rgb(" + c.join(",") + ")";
}
function option(sel, value, text) { sel.appendChild(h("option", { value: String(value) }, text)); }
function legendItem(parent, color, text, ring) {
  var sp = h("span");
  var sw = h("span", { "class": "sw" });
  sw.style.background = ring ? "transparent" : color;
  if (ring) sw.style.border = "2px solid " + color;
  sp.appendChild(sw);
  sp.appendChild(document.createTextNode(text));
  parent.appendChild(sp);
}

var D = JSON.parse(byId("trace-data").textContent);
var L = D.model.layers || D.model.seen_layers;
function posText(p) {
  var t = D.ptext[String(p)];
  return t === undefined ? "#" + p : t;
}
function vocabText(id) {
  var t = D.vocab[String(id)];
  return t === undefined ? "<" + id + ">" : t;
}
var rendered = {};

function renderMeta() {
  var m = D.model, sm = D.summary, parts = [];
  parts.push(m.name + ": " + m.layers + " layers, hidden " + m.dim + ", " + m.heads + " heads / " + m.kv_heads + " KV heads, vocab " + m.vocab);
  parts.push("trace " + D.config + ", " + sm.forwards + " forwards" + (sm.positions ? " (positions " + sm.positions[0] + "\u2013" + sm.positions[1] + ")" : "") + ", " + D.fw.length + " retained in detail");
  var an = sm.anomaly_counts.filter(function (k) { return k[1] > 0; }).map(function (k) { return k[0] + " in " + k[1]; });
  parts.push(an.length ? "anomalies: " + an.join(", ") : "no anomalies");
  var meta = byId("meta");
  meta.textContent = parts.join(" \u00b7 ");
  if (sm.first_anomaly) {
    meta.appendChild(h("br"));
    meta.appendChild(h("span", { "class": "warn" }, "first anomaly: " + sm.first_anomaly));
  }
}

// ---- activation health -------------------------------------------------
var KIND_COLOR = { "nan": "#d62728", "inf": "#ff7f0e", "explosion": "#e377c2", "vanishing": "#1f77b4", "residual_dominance": "#7f7f7f" };
function actRows() {
  var rows = [{ label: "embedding", layer: null, stage: "embedding" }];
  for (var l = 0; l < L; l++) rows.push({ label: "L" + l, layer: l, stage: null });
  rows.push({ label: "final norm", layer: null, stage: "final_norm" });
  rows.push({ label: "logits", layer: null, stage: "logits" });
  return rows;
}
function statValue(a, which) {
  // a: [layer, stage, count, mean, std, l2, max_abs, nan, inf]
  if (which === "std") return a[4];
  if (which === "l2") return a[5];
  if (which === "maxabs") return a[6];
  return a[3] === null ? null : Math.abs(a[3]);
}
function renderActivations() {
  var plot = clear(byId("act-plot"));
  var which = byId("act-stat").value, stage = byId("act-stage").value;
  var fw = D.fw, rows = actRows();
  if (!fw.length || !fw.some(function (f) { return f.a.length; })) {
    plot.appendChild(h("p", { "class": "empty" }, "No activation statistics were recorded."));
    return 0;
  }
  var lookup = fw.map(function (f) {
    var m = {};
    f.a.forEach(function (a) { m[(a[0] === null ? "" : a[0]) + "|" + a[1]] = a; });
    return m;
  });
  function cellStats(col, row) {
    var r = rows[row];
    var key = r.layer === null ? "|" + r.stage : r.layer + "|" + stage;
    return lookup[col][key];
  }
  var lo = Infinity, hi = -Infinity;
  for (var c = 0; c < fw.length; c++) for (var r = 0; r < rows.length; r++) {
    var a = cellStats(c, r);
    if (!a) continue;
    var v = statValue(a, which);
    if (v !== null && v > 0) { var lv = Math.log10(v); lo = Math.min(lo, lv); hi = Math.max(hi, lv); }
  }
  if (!(hi >= lo)) { lo = 0; hi = 1; }
  if (hi - lo < 1e-6) hi = lo + 1;
  byId("act-range").textContent = "colour: log10 " + which + " from " + fmt(Math.pow(10, lo)) + " (dark) to " + fmt(Math.pow(10, hi)) + " (bright)";
  var labelW = 74, top = fw.length <= 96 ? 62 : 14;
  var cw = Math.max(3, Math.min(26, Math.floor(1100 / fw.length))), ch = 12;
  var W = labelW + cw * fw.length + 4, H = top + ch * rows.length + 4;
  var svg = s("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H });
  var drawn = 0;
  rows.forEach(function (row, r) {
    svg.appendChild(s("text", { x: labelW - 4, y: top + r * ch + ch - 2, "text-anchor": "end" }, row.label));
  });
  fw.forEach(function (f, c) {
    if (top > 20) {
      var x = labelW + c * cw + cw / 2 + 3;
      svg.appendChild(tip(s("text", { transform: "translate(" + x + "," + (top - 4) + ") rotate(-60)" }, vis(posText(f.p)).slice(0, 12)), "position " + f.p));
    }
    rows.forEach(function (row, r) {
      var a = cellStats(c, r), fill = "#eceff2", label;
      var where = (row.layer === null ? row.stage : "layer " + row.layer + " " + stage) + ", position " + f.p + " " + JSON.stringify(posText(f.p));
      if (a) {
        var v = statValue(a, which);
        if (a[7] + a[8] > 0) fill = "#111";
        else if (v !== null && v > 0) fill = ramp(VIRIDIS, (Math.log10(v) - lo) / (hi - lo));
        else fill = "#cfd4da";
        label = where + "\nstd " + fmt(a[4]) + ", L2 " + fmt(a[5]) + ", max |x| " + fmt(a[6]) + ", mean " + fmt(a[3]) + "\nNaN " + a[7] + ", Inf " + a[8] + " of " + a[2];
      } else label = where + ": not recorded";
      svg.appendChild(tip(s("rect", { "class": "cell", x: labelW + c * cw, y: top + r * ch, width: cw, height: ch, fill: fill }), label));
      drawn++;
    });
    f.an.forEach(function (an) {
      // an: [layer, stage, kind, origin, text]
      var r = an[0] !== null ? an[0] + 1 : an[1] === "embedding" ? 0 : an[1] === "final_norm" ? L + 1 : L + 2;
      var here = an[0] === null || an[1] === stage;
      var col = KIND_COLOR[an[2]] || "#d62728";
      var mark = s("circle", { cx: labelW + c * cw + cw / 2, cy: top + r * ch + ch / 2, r: Math.max(2, Math.min(cw, ch) / 2 - 1),
        fill: here ? col : "none", stroke: here ? "#fff" : col, "stroke-width": here ? 1 : 2, "class": "anomaly" });
      svg.appendChild(tip(mark, an[4] + (here ? "" : " (at stage " + an[1] + ")")));
    });
  });
  plot.appendChild(svg);
  var lg = clear(byId("act-legend"));
  Object.keys(KIND_COLOR).forEach(function (k) { legendItem(lg, KIND_COLOR[k], k); });
  legendItem(lg, "#333", "ring: anomaly at another stage of that layer", true);
  legendItem(lg, "#111", "black cell: NaN/Inf values");
  legendItem(lg, "#eceff2", "not recorded");
  return drawn;
}

// ---- attention ---------------------------------------------------------
var att = { layer: 0, head: 0 };
function headGrid(parent, title, idx, stops, lo, hi) {
  var wrap = h("div");
  wrap.appendChild(h("div", { "class": "note" }, title));
  var heads = D.model.heads || 1;
  D.heads.forEach(function (x) { heads = Math.max(heads, x[1] + 1); });
  var cw = 16, ch = 10, left = 28, top = 14;
  var W = left + cw * heads + 2, H = top + ch * L + 2;
  var svg = s("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H });
  for (var hd = 0; hd < heads; hd++) svg.appendChild(s("text", { x: left + hd * cw + cw / 2, y: top - 3, "text-anchor": "middle" }, "h" + hd));
  for (var l = 0; l < L; l += Math.max(1, Math.ceil(L / 15))) svg.appendChild(s("text", { x: left - 3, y: top + l * ch + ch - 1, "text-anchor": "end" }, "L" + l));
  var n = 0;
  D.heads.forEach(function (x) {
    var v = x[idx];
    var rect = s("rect", { "class": "cell", x: left + x[1] * cw, y: top + x[0] * ch, width: cw, height: ch,
      fill: v === null ? "#ccc" : ramp(stops, (v - lo) / (hi - lo)) });
    rect.style.cursor = "pointer";
    tip(rect, "layer " + x[0] + " head " + x[1] + "\nsink share " + fmt(x[2]) + " (mean weight on the first token " + fmt(x[3]) + ")\nmean normalized entropy " + fmt(x[4]) + ", tail mass " + fmt(x[5]) + "\nrecency share " + fmt(x[6]) + ", " + x[7] + " summaries");
    rect.addEventListener("click", function () { att.layer = x[0]; att.head = x[1]; syncAttSelects(); renderAttention(); });
    svg.appendChild(rect);
    n++;
  });
  svg.appendChild(s("rect", { "class": "sel", x: left + att.head * cw, y: top + att.layer * ch, width: cw, height: ch }));
  wrap.appendChild(svg);
  parent.appendChild(wrap);
  return n;
}
function syncAttSelects() { byId("att-layer").value = String(att.layer); byId("att-head").value = String(att.head); }
function renderAttention() {
  var grid = clear(byId("att-grid")), topEl = clear(byId("att-top")), toks = clear(byId("att-tokens"));
  if (!D.heads.length) {
    grid.appendChild(h("p", { "class": "empty" }, "Attention was not traced (it needs the Full config)."));
    return 0;
  }
  att.layer = +byId("att-layer").value; att.head = +byId("att-head").value;
  var row = h("div", { "class": "row" });
  var n = headGrid(row, "sink share (click a head)", 2, BLUES, 0, 1);
  n += headGrid(row, "mean normalized entropy", 4, VIRIDIS, 0, 1);
  grid.appendChild(row);
  var pos = +byId("att-pos").value;
  var f = D.fw.filter(function (x) { return x.p === pos; })[0];
  var t = f && f.at.filter(function (x) { return x[0] === att.layer && x[1] === att.head; })[0];
  if (!t) { topEl.appendChild(h("p", { "class": "empty" }, "No summary of layer " + att.layer + " head " + att.head + " at position " + pos + ".")); return n; }
  // t: [layer, head, context_len, sink, entropy, norm_entropy, tail, [positions], [weights]]
  topEl.appendChild(h("div", { "class": "note" }, "top-" + t[7].length + " of " + t[2] + " attended positions; entropy " + fmt(t[4]) + " nats, tail mass " + fmt(t[6])));
  var tbl = h("table"), hr = h("tr");
  ["#", "position", "token", "weight"].forEach(function (c, i) { hr.appendChild(h("th", { "class": i === 2 ? "l" : "" }, c)); });
  tbl.appendChild(hr);
  var weight = {};
  t[7].forEach(function (p, i) {
    var w = t[8][i];
    if (p !== null) weight[p] = w;
    var tr = h("tr");
    tr.appendChild(h("td", null, String(i + 1)));
    tr.appendChild(h("td", null, p === null ? "?" : String(p)));
    tr.appendChild(h("td", { "class": "l" }, p === null ? "(slot unknown)" : vis(posText(p))));
    var td = h("td"), bar = h("span", { "class": "bar" });
    bar.style.width = Math.round(60 * (w || 0)) + "px";
    td.appendChild(bar); td.appendChild(document.createTextNode(" " + fmt(w)));
    tr.appendChild(td);
    tbl.appendChild(tr);
  });
  topEl.appendChild(tbl);
  // The query's context: attended positions before the window, then the window.
  var start = Math.max(0, pos - 47);
  var early = Object.keys(weight).map(Number).filter(function (p) { return p < start; }).sort(function (a, b) { return a - b; });
  function chip(p) {
    var w = weight[p] || 0;
    var sp = h("span", { "class": "tok" + (p === pos ? " q" : ""), title: "position " + p + ", weight " + fmt(w) }, vis(posText(p)));
    sp.style.background = "rgba(228,87,46," + Math.min(1, Math.sqrt(w)).toFixed(3) + ")";
    toks.appendChild(sp);
  }
  early.forEach(chip);
  if (early.length) toks.appendChild(document.createTextNode(" \u2026 "));
  for (var p = start; p <= pos; p++) chip(p);
  return n + t[7].length;
}

// ---- logit lens --------------------------------------------------------
function renderLens() {
  var plot = clear(byId("lens-plot")), hist = clear(byId("lens-hist"));
  var pos = +byId("lens-pos").value;
  var f = D.fw.filter(function (x) { return x.p === pos && x.lens.length; })[0];
  if (!f) { plot.appendChild(h("p", { "class": "empty" }, "The logit lens was not traced (it needs the Full config).")); return 0; }
  var layers = [];
  f.lens.forEach(function (t) { t[1].forEach(function (l) { if (layers.indexOf(l) < 0) layers.push(l); }); });
  layers.sort(function (a, b) { return a - b; });
  var left = 120, top = 16, cw = Math.max(12, Math.min(30, Math.floor(560 / Math.max(1, layers.length)))), ch = 20;
  var W = left + cw * layers.length + 4, H = top + ch * f.lens.length + 4;
  var svg = s("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H });
  var step = Math.max(1, Math.ceil(layers.length / 16));
  layers.forEach(function (l, i) { if (i % step === 0) svg.appendChild(s("text", { x: left + i * cw + cw / 2, y: top - 4, "text-anchor": "middle" }, "L" + l)); });
  var vocab = Math.max(2, D.model.vocab);
  var n = 0;
  f.lens.forEach(function (t, r) {
    // t: [token, [layers], [ranks], decisive, won]
    var chosen = t[0] === f.sel;
    svg.appendChild(tip(s("text", { x: left - 4, y: top + r * ch + ch / 2 + 3, "text-anchor": "end", "font-weight": chosen ? "bold" : "normal" },
      (chosen ? "\u2605 " : "") + vis(vocabText(t[0])).slice(0, 16)), "token id " + t[0] + (chosen ? " (chosen)" : "")));
    t[1].forEach(function (l, i) {
      var c = layers.indexOf(l), rank = t[2][i];
      var x = left + c * cw, y = top + r * ch;
      var tt = Math.log(1 + rank) / Math.log(1 + vocab);
      var rect = s("rect", { "class": "cell", x: x, y: y, width: cw, height: ch, fill: ramp(RDYLGN, 1 - tt) });
      tip(rect, JSON.stringify(vocabText(t[0])) + " at layer " + l + ": rank " + rank + (l === t[3] ? " (decisive layer: largest log-rank gain)" : "") + (l === t[4] ? " (won here)" : ""));
      svg.appendChild(rect);
      if (String(rank).length * 6 + 2 <= cw) svg.appendChild(s("text", { x: x + cw / 2, y: y + ch / 2 + 3, "text-anchor": "middle", "pointer-events": "none" }, String(rank)));
      if (l === t[3]) svg.appendChild(s("rect", { "class": "decisive", x: x + 1, y: y + 1, width: cw - 2, height: ch - 2, fill: "none", stroke: "#111", "stroke-width": 2.5 }));
      n++;
    });
  });
  plot.appendChild(svg);
  var lg = h("div", { "class": "legend" });
  legendItem(lg, ramp(RDYLGN, 1), "rank 0");
  legendItem(lg, ramp(RDYLGN, 0.5), "rank \u2248 " + Math.round(Math.sqrt(vocab)));
  legendItem(lg, ramp(RDYLGN, 0), "rank " + vocab);
  legendItem(lg, "#111", "decisive layer (largest log-rank gain)", true);
  legendItem(lg, "#fff", "\u2605 the chosen token");
  plot.appendChild(lg);
  if (D.summary.decisive.length) {
    var txt = D.summary.decisive.map(function (d) { return "L" + d[0] + "\u00d7" + d[1]; }).join("  ");
    hist.appendChild(h("p", { "class": "note" }, "decisive layers (largest log-rank gain) over the session: " + txt));
  }
  return n;
}

// ---- quantization ------------------------------------------------------
function renderQuant() {
  var plot = clear(byId("q-plot")), table = clear(byId("q-table")), worstEl = byId("q-worst");
  if (!D.bricks.length) { worstEl.textContent = ""; plot.appendChild(h("p", { "class": "empty" }, "Quantization error was not traced (it needs the Full config).")); return 0; }
  var agg = byId("q-agg").value;
  var w = D.worst;
  worstEl.textContent = w ? "worst brick: " + w.brick + " of layer " + w.layer + " (" + w.type + " weights): cosine " + fmt(w.cosine) + ", SNR " + fmt(w.snr_db) + " dB, max |err| " + fmt(w.max_abs_error) : "";
  var names = D.brick_names.filter(function (b) { return D.bricks.some(function (x) { return x[0] === b; }); });
  var left = 110, top = 14, cw = Math.max(8, Math.min(22, Math.floor(520 / Math.max(1, L)))), ch = 16;
  var W = left + cw * Math.max(1, L) + 4, H = top + ch * names.length + 4;
  var svg = s("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H });
  for (var l = 0; l < L; l += Math.max(1, Math.ceil(L / 15))) svg.appendChild(s("text", { x: left + l * cw + cw / 2, y: top - 3, "text-anchor": "middle" }, "L" + l));
  names.forEach(function (b, r) { svg.appendChild(s("text", { x: left - 4, y: top + r * ch + ch - 4, "text-anchor": "end" }, b === "lm_head" ? "lm_head (output)" : b)); });
  var n = 0;
  D.bricks.forEach(function (x) {
    // x: [brick, layer, type, samples, mean_cos, min_cos, mean_snr]
    var r = names.indexOf(x[0]), cos = agg === "min" ? x[5] : x[4];
    var fill = cos === null ? "#111" : ramp(RDYLGN, 1 - (Math.log10(Math.max(1e-7, 1 - cos)) + 6) / 5);
    var rect = s("rect", { "class": "cell", x: left + x[1] * cw, y: top + r * ch, width: cw, height: ch, fill: fill });
    tip(rect, x[0] + " layer " + x[1] + " (" + x[2] + "): " + agg + " cosine " + fmt(cos) + " over " + x[3] + " samples, mean SNR " + fmt(x[6]) + " dB");
    svg.appendChild(rect);
    if (w && w.brick === x[0] && w.layer === x[1]) svg.appendChild(s("rect", { "class": "sel worst", x: left + x[1] * cw, y: top + r * ch, width: cw, height: ch }));
    n++;
  });
  plot.appendChild(svg);
  var lg = h("div", { "class": "legend" });
  legendItem(lg, ramp(RDYLGN, 1), "1 \u2212 cos \u2264 1e-6");
  legendItem(lg, ramp(RDYLGN, 0.6), "1e-4");
  legendItem(lg, ramp(RDYLGN, 0.2), "1e-2 (critical)");
  legendItem(lg, "#111", "NaN");
  legendItem(lg, "#e4572e", "worst brick", true);
  plot.appendChild(lg);
  var tbl = h("table"), hr = h("tr");
  ["brick", "samples", "mean cosine", "critical"].forEach(function (c, i) { hr.appendChild(h("th", { "class": i ? "" : "l" }, c)); });
  tbl.appendChild(hr);
  D.brick_summary.forEach(function (b) {
    var tr = h("tr");
    tr.appendChild(h("td", { "class": "l" }, b[0]));
    tr.appendChild(h("td", null, String(b[1])));
    tr.appendChild(h("td", null, b[2] === null ? "n/a" : b[2].toFixed(6)));
    tr.appendChild(h("td", null, String(b[3])));
    tbl.appendChild(tr);
  });
  table.appendChild(tbl);
  return n;
}

// ---- KV cache ----------------------------------------------------------
function renderKv() {
  var stats = clear(byId("kv-stats")), plot = clear(byId("kv-plot"));
  var k = D.kv, tot = D.kv_total;
  if (!k.length) { plot.appendChild(h("p", { "class": "empty" }, "The KV cache was not traced.")); return 0; }
  function stat(label, value) { var sp = h("span", { "class": "stat" }); sp.appendChild(h("b", null, value)); sp.appendChild(document.createTextNode(" " + label)); stats.appendChild(sp); }
  if (tot) {
    stat("steps", String(tot.steps));
    stat("evictions", String(tot.evictions));
    stat("peak utilization", (100 * tot.peak_utilization).toFixed(1) + "%");
    stat("mean hit rate", (100 * tot.avg_hit_rate).toFixed(1) + "%");
    stat("peak KiB", (tot.peak_bytes / 1024).toFixed(1));
  }
  var W = 560, H = 170, left = 34, right = 34, top = 10, bottom = 22;
  var pw = W - left - right, ph = H - top - bottom;
  var svg = s("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H });
  var n = k.length, maxEv = 1;
  k.forEach(function (x) { maxEv = Math.max(maxEv, x[3]); });
  function X(i) { return left + (n === 1 ? pw / 2 : i * pw / (n - 1)); }
  function Y(v) { return top + ph * (1 - Math.max(0, Math.min(1, v))); }
  svg.appendChild(s("rect", { x: left, y: top, width: pw, height: ph, fill: "#fafbfc", stroke: "#dde1e6" }));
  [0, 0.5, 1].forEach(function (v) { svg.appendChild(s("text", { x: left - 4, y: Y(v) + 3, "text-anchor": "end" }, (100 * v) + "%")); });
  svg.appendChild(s("text", { x: W - right + 4, y: top + 8 }, String(maxEv)));
  svg.appendChild(s("text", { x: W - right + 4, y: top + ph }, "0"));
  var bw = Math.max(1, pw / Math.max(1, n));
  var bars = 0;
  k.forEach(function (x, i) {
    if (x[3] > 0) {
      var hgt = ph * x[3] / maxEv;
      svg.appendChild(tip(s("rect", { x: X(i) - bw / 2, y: top + ph - hgt, width: bw, height: hgt, fill: "#d62728", opacity: 0.45 }), "step " + x[0] + ": " + x[3] + " evictions"));
      bars++;
    }
  });
  function line(idx, color, name) {
    var pts = k.map(function (x, i) { return X(i).toFixed(1) + "," + Y(x[idx] === null ? 0 : x[idx]).toFixed(1); }).join(" ");
    svg.appendChild(tip(s("polyline", { points: pts, fill: "none", stroke: color, "stroke-width": 1.6 }), name));
  }
  line(1, "#3b528b", "utilization");
  line(2, "#1a9850", "hit rate");
  svg.appendChild(s("text", { x: left, y: H - 6 }, "step " + k[0][0]));
  svg.appendChild(s("text", { x: W - right, y: H - 6, "text-anchor": "end" }, "step " + k[n - 1][0]));
  plot.appendChild(svg);
  var lg = h("div", { "class": "legend" });
  legendItem(lg, "#3b528b", "utilization (left axis)");
  legendItem(lg, "#1a9850", "hit rate (left axis)");
  legendItem(lg, "#d62728", "evictions per step (right axis)");
  plot.appendChild(lg);
  return n + bars;
}

function setup() {
  var st = byId("act-stage");
  D.stages.forEach(function (x) { option(st, x, x); });
  st.value = "output";
  var ap = byId("att-pos"), lp = byId("lens-pos");
  D.fw.forEach(function (f) {
    var label = f.p + ": " + vis(posText(f.p)).slice(0, 14);
    if (f.at.length) option(ap, f.p, label);
    if (f.lens.length) option(lp, f.p, label);
  });
  if (ap.options.length) ap.selectedIndex = ap.options.length - 1;
  if (lp.options.length) lp.selectedIndex = lp.options.length - 1;
  var al = byId("att-layer"), ah = byId("att-head"), heads = 0;
  for (var l = 0; l < L; l++) option(al, l, String(l));
  D.heads.forEach(function (x) { heads = Math.max(heads, x[1] + 1); });
  for (var hd = 0; hd < heads; hd++) option(ah, hd, String(hd));
  // Start on the head with the largest sink share: the most telling one.
  var best = null;
  D.heads.forEach(function (x) { if (x[2] !== null && (!best || x[2] > best[2])) best = x; });
  if (best) { att.layer = best[0]; att.head = best[1]; }
  syncAttSelects();
  function on(id, fn) { byId(id).addEventListener("change", function () { try { fn(); } catch (e) { fail(String(e)); } }); }
  on("act-stat", renderActivations); on("act-stage", renderActivations);
  on("att-pos", renderAttention); on("att-layer", renderAttention); on("att-head", renderAttention);
  on("lens-pos", renderLens); on("q-agg", renderQuant);
}

try {
  renderMeta();
  setup();
  rendered.activations = renderActivations();
  rendered.attention = renderAttention();
  rendered.lens = renderLens();
  rendered.quant = renderQuant();
  rendered.kv = renderKv();
  body.setAttribute("data-rendered", Object.keys(rendered).map(function (k) { return k + ":" + rendered[k]; }).join(","));
  if (body.getAttribute("data-status") === "loading") body.setAttribute("data-status", "ok");
} catch (e) {
  fail(e && e.stack ? String(e.stack) : String(e));
}
})();
