// The live page: polls /ui/snapshot every second, fills the tables, draws the charts with uPlot.
(function () {
  "use strict";
  var KEEP = 900;                       // points kept per chart (15 minutes at one a second)
  var history = { t: [], agentSpend: {}, agentTokens: {}, backendSpend: {}, backendTokens: {} };
  var charts = {};
  var COLORS = ["#2e90fa", "#f79009", "#12b76a", "#d92d20", "#7a5af8", "#ee46bc", "#06aed4", "#66c61c",
                "#875bf7", "#ef6820"];

  function $(id) { return document.getElementById(id); }
  function esc(s) { return String(s == null ? "" : s); }
  function fmtUsd(v) { return v == null ? "-" : (v === 0 ? "0" : v < 0.01 ? v.toFixed(6) : v.toFixed(4)); }
  function fmtInt(v) { return v == null ? "-" : Number(v).toLocaleString("en-US"); }
  function cell(row, text, cls) {
    var td = document.createElement("td");
    td.textContent = esc(text);
    if (cls) { td.className = cls; }
    row.appendChild(td);
    return td;
  }
  function bar(td, percent) {
    if (percent == null) { td.textContent = "-"; return; }
    var outer = document.createElement("span");
    outer.className = "bar" + (percent >= 95 ? " bad" : percent >= 75 ? " warn" : "");
    var inner = document.createElement("span");
    inner.style.width = Math.min(100, percent) + "%";
    outer.appendChild(inner);
    td.appendChild(outer);
    td.appendChild(document.createTextNode(percent.toFixed(1) + "%"));
  }
  function fill(id, rows, render) {
    var body = $(id).tBodies[0];
    var fresh = document.createElement("tbody");
    rows.forEach(function (r) { var tr = document.createElement("tr"); render(tr, r); fresh.appendChild(tr); });
    body.parentNode.replaceChild(fresh, body);
  }
  function clock(ts) { return new Date(ts * 1000).toLocaleTimeString(); }

  function push(series, key, n, value) {
    if (!series[key]) { series[key] = new Array(n).fill(null); }
    series[key].push(value);
  }
  function record(snap) {
    var n = history.t.length;
    history.t.push(snap.taken_at);
    snap.agents.forEach(function (a) {
      push(history.agentSpend, a.agent, n, a.spend_usd == null ? 0 : a.spend_usd);
      push(history.agentTokens, a.agent, n, a.tokens_per_min);
    });
    snap.backends.forEach(function (b) {
      push(history.backendSpend, b.backend, n, b.spend_usd == null ? 0 : b.spend_usd);
      push(history.backendTokens, b.backend, n, b.tokens_per_min);
    });
    [history.agentSpend, history.agentTokens, history.backendSpend, history.backendTokens].forEach(function (s) {
      Object.keys(s).forEach(function (k) { while (s[k].length < n + 1) { s[k].push(null); } });
    });
    if (history.t.length > KEEP) {
      history.t.shift();
      [history.agentSpend, history.agentTokens, history.backendSpend, history.backendTokens].forEach(function (s) {
        Object.keys(s).forEach(function (k) { s[k].shift(); });
      });
    }
  }
  function draw(id, series, money) {
    var el = $(id);
    var names = Object.keys(series).sort();
    var data = [history.t.slice()].concat(names.map(function (k) { return series[k].slice(); }));
    var width = Math.max(200, el.clientWidth || 300);
    var c = charts[id];
    if (!c || c.names.join("\u0000") !== names.join("\u0000")) {
      if (c) { c.plot.destroy(); }
      var opts = {
        width: width, height: window.innerWidth < 600 ? 180 : 220,
        series: [{}].concat(names.map(function (k, i) {
          return { label: k, stroke: COLORS[i % COLORS.length], width: 2,
                   value: function (u, v) { return v == null ? "-" : money ? fmtUsd(v) : fmtInt(Math.round(v)); } };
        })),
        axes: [{}, { size: 70, values: function (u, vals) {
          return vals.map(function (v) { return money ? "$" + fmtUsd(v) : fmtInt(v); }); } }],
        scales: { x: { time: true } },
        legend: { live: true }
      };
      charts[id] = c = { names: names, plot: new uPlot(opts, data, el) };
    } else {
      c.plot.setData(data);
      if (Math.abs(c.plot.width - width) > 4) { c.plot.setSize({ width: width, height: c.plot.height }); }
    }
    el.setAttribute("data-points", String(history.t.length));
  }

  function show(snap) {
    $("status").textContent = "live - " + snap.source + " - " + clock(snap.taken_at);
    $("empty").hidden = !(snap.agents.length === 0 && snap.errors.length === 0);
    $("notes").hidden = !snap.notes.length;
    $("notes").textContent = snap.notes.join("; ");
    fill("agents", snap.agents, function (tr, a) {
      tr.setAttribute("data-agent", a.agent);
      cell(tr, a.agent);
      cell(tr, fmtInt(a.requests_per_min), "n");
      cell(tr, fmtInt(a.tokens_per_min), "n");
      cell(tr, fmtUsd(a.usd_per_min), "n");
      cell(tr, fmtUsd(a.spend_usd), "n");
      cell(tr, fmtInt(a.requests), "n");
      cell(tr, fmtInt(a.errors), "n");
      bar(cell(tr, ""), a.budget_percent);
    });
    fill("backends", snap.backends, function (tr, b) {
      tr.setAttribute("data-backend", b.backend);
      cell(tr, b.backend);
      cell(tr, b.provider);
      cell(tr, b.in_flight == null ? "-" : b.in_flight + (b.max_concurrent ? " / " + b.max_concurrent : ""), "n");
      cell(tr, b.queued == null ? "-" : b.queued, "n");
      cell(tr, b.cooling_down > 0 ? b.cooling_down.toFixed(1) + " s" : "-", "n" + (b.cooling_down > 0 ? " cooling" : ""));
      cell(tr, b.circuit, b.circuit === "closed" ? "" : b.circuit);
      cell(tr, fmtInt(b.requests_per_min), "n");
      cell(tr, fmtInt(b.errors_per_min), "n");
      cell(tr, fmtInt(b.tokens_per_min), "n");
      cell(tr, fmtUsd(b.spend_usd), "n");
    });
    fill("budgets", snap.budgets, function (tr, b) {
      cell(tr, b.scope);
      cell(tr, b.key == null ? "-" : b.key);
      bar(cell(tr, ""), b.percent);
      cell(tr, b.limit_tokens == null ? "-" : fmtInt(b.used_tokens) + " / " + fmtInt(b.limit_tokens));
      cell(tr, b.limit_usd == null ? "-" : "$" + fmtUsd(b.used_usd) + " / $" + b.limit_usd);
      cell(tr, b.window);
    });
    fill("errors", snap.errors, function (tr, e) {
      cell(tr, clock(e.time));
      cell(tr, e.agent);
      cell(tr, e.backend);
      cell(tr, e.model);
      cell(tr, e.outcome);
    });
    record(snap);
    draw("chart-agent-spend", history.agentSpend, true);
    draw("chart-agent-tokens", history.agentTokens, false);
    draw("chart-backend-spend", history.backendSpend, true);
    draw("chart-backend-tokens", history.backendTokens, false);
  }

  function poll() {
    fetch("/ui/snapshot", { credentials: "same-origin", cache: "no-store" }).then(function (resp) {
      if (resp.status === 401 || resp.status === 403) { window.location.assign("/ui"); return null; }
      if (!resp.ok) { throw new Error("HTTP " + resp.status); }
      return resp.json();
    }).then(function (snap) {
      if (snap) { show(snap); }
    }).catch(function (err) {
      $("status").textContent = "cannot reach the gateway (" + err.message + "); retrying";
    }).finally(function () {
      setTimeout(poll, 1000);
    });
  }
  window.addEventListener("resize", function () {
    Object.keys(charts).forEach(function (id) {
      var el = $(id);
      charts[id].plot.setSize({ width: Math.max(200, el.clientWidth), height: window.innerWidth < 600 ? 180 : 220 });
    });
  });
  poll();
}());
