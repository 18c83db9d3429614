// Small line charts on a canvas: time on x, one or more series on y, gridlines, labels and a legend.
"use strict";

function drawChart(canvas, series, opts) {
  opts = opts || {};
  const dpr = window.devicePixelRatio || 1;
  const cssW = canvas.clientWidth || 400, cssH = canvas.clientHeight || Number(canvas.getAttribute("height")) || 200;
  if (canvas.width !== Math.round(cssW * dpr) || canvas.height !== Math.round(cssH * dpr)) {
    canvas.width = Math.round(cssW * dpr);
    canvas.height = Math.round(cssH * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, cssW, cssH);
  const pad = { l: 56, r: 12, t: 24, b: 26 };
  const w = cssW - pad.l - pad.r, h = cssH - pad.t - pad.b;
  const all = series.flatMap(s => s.points);
  ctx.font = "12px system-ui, sans-serif";
  if (all.length < 2) {
    ctx.fillStyle = "#8a94a6";
    ctx.fillText(opts.empty || "waiting for data…", pad.l, pad.t + h / 2);
    return;
  }
  const x0 = Math.min(...all.map(p => p[0])), x1 = Math.max(...all.map(p => p[0]));
  let y1 = Math.max(...all.map(p => p[1]), opts.minMax || 0);
  y1 = niceCeil(y1 > 0 ? y1 * 1.08 : 1);
  const X = x => pad.l + (x1 > x0 ? (x - x0) / (x1 - x0) : 0) * w;
  const Y = y => pad.t + h - (y / y1) * h;

  ctx.strokeStyle = "#e3e6eb"; ctx.fillStyle = "#667085"; ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = (y1 / 4) * i, y = Y(v);
    ctx.beginPath(); ctx.moveTo(pad.l, y); ctx.lineTo(pad.l + w, y); ctx.stroke();
    ctx.textAlign = "right"; ctx.fillText(shortNumber(v), pad.l - 6, y + 4);
  }
  ctx.textAlign = "left"; ctx.fillText(clock(x0), pad.l, cssH - 8);
  ctx.textAlign = "right"; ctx.fillText(clock(x1), pad.l + w, cssH - 8);

  let lx = pad.l;
  for (const s of series) {
    if (!s.points.length) continue;
    ctx.strokeStyle = s.color; ctx.lineWidth = s.width || 2; ctx.setLineDash(s.dashed ? [6, 4] : []);
    ctx.beginPath();
    s.points.forEach((p, i) => (i ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1]))));
    ctx.stroke();
    ctx.setLineDash([]);
    ctx.fillStyle = s.color; ctx.fillRect(lx, 7, 12, 3);
    ctx.fillStyle = "#1d2330"; ctx.textAlign = "left"; ctx.fillText(s.label, lx + 16, 12);
    lx += ctx.measureText(s.label).width + 36;
  }
}

function niceCeil(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function shortNumber(v) {
  if (v >= 1e6) return (v / 1e6).toFixed(v >= 1e7 ? 0 : 1) + "M";
  if (v >= 1e3) return (v / 1e3).toFixed(v >= 1e4 ? 0 : 1) + "k";
  return v >= 10 ? v.toFixed(0) : v.toFixed(1);
}

function clock(t) {
  return new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}
