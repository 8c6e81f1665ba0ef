/* Axiom Energy Grid resource monitor. Renders the fleet page and the per-agent monitor from JSON, polls for
   fresh figures without reloading the page, and posts actions with the CSRF token. No third-party code:
   the charts are plain SVG. */
(function () {
  "use strict";

  var POLL_MS = 15000;
  var COLORS = ["#2563eb", "#d97706", "#059669", "#7c3aed", "#db2777", "#0891b2"];
  var SVG_NS = "http://www.w3.org/2000/svg";

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (key) {
      if (key === "text") node.textContent = attrs[key];
      else node.setAttribute(key, attrs[key]);
    });
    (children || []).forEach(function (child) { if (child) node.appendChild(child); });
    return node;
  }

  function svg(tag, attrs) {
    var node = document.createElementNS(SVG_NS, tag);
    Object.keys(attrs || {}).forEach(function (key) { node.setAttribute(key, attrs[key]); });
    return node;
  }

  /* One format everywhere: numbers with thousands separators; money as "$1,234.56" (finer below a dollar,
     so a run's $0.004 left is not "$0.00"); days as 2026-12-06; moments as 2026-12-06 14:05 UTC. */
  function fmt(n) { return n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"); }
  function money(s) {
    if (s === null || s === undefined) return "–";
    var n = Number(s);
    return (n < 0 ? "−$" : "$") + Math.abs(n).toLocaleString("en-US", {minimumFractionDigits: 2, maximumFractionDigits: Math.abs(n) < 1 ? 6 : 2});
  }
  function day(iso) { return iso ? iso.slice(0, 10) : "–"; }
  function when(iso) { return iso ? iso.replace("T", " ").slice(0, 16) + " UTC" : "–"; }
  /* Axis ticks at round steps (1, 2 or 5 times a power of ten), all labelled with the same decimals. */
  function ticks(max, count) {
    var raw = max / count, power = Math.pow(10, Math.floor(Math.log10(raw)));
    var step = [1, 2, 5, 10].map(function (m) { return m * power; }).filter(function (v) { return v >= raw; })[0];
    var values = [];
    for (var v = 0; v <= max + step / 2; v += step) values.push(v);
    if (values[values.length - 1] < max) values.push(values[values.length - 1] + step);
    var decimals = step >= 1 ? 0 : 2;
    return values.map(function (v) { return {value: v, label: "$" + v.toLocaleString("en-US", {minimumFractionDigits: decimals, maximumFractionDigits: decimals})}; });
  }
  function levelLabel(level) { return level === "critical" ? "Critical" : level === "warning" ? "Warning" : "OK"; }
  function setPanel(root, name, node) {
    var panel = root.querySelector('[data-panel="' + name + '"]');
    if (!panel) return;
    panel.replaceChildren(node);
  }
  function bind(name, text) {
    document.querySelectorAll('[data-bind="' + name + '"]').forEach(function (n) { n.textContent = text; });
  }
  function status(text) { var live = document.getElementById("live-status"); if (live) live.textContent = text; }

  /* A cell knows its column's name (data-label): on a phone each row becomes a card of label: value. */
  function cell(header, c) {
    return c instanceof Node ? el("td", {"data-label": header}, [c]) : el("td", {"data-label": header, text: c});
  }
  function table(headers, rows, caption, className) {
    var thead = el("thead", {}, [el("tr", {}, headers.map(function (h) { return el("th", {scope: "col", text: h}); }))]);
    var tbody = el("tbody", {}, rows.map(function (cells) {
      return el("tr", {}, cells.map(function (c, i) { return cell(headers[i], c); }));
    }));
    return el("table", {class: "stack" + (className ? " " + className : "")}, [caption ? el("caption", {class: "sr-only", text: caption}) : null, thead, tbody]);
  }
  function empty(text) { return el("p", {class: "muted", text: text}); }
  function link(href, text) { return el("a", {href: href, text: text}); }
  function badge(level, text) { return el("span", {class: "badge " + level, text: text}); }

  /* ---------------- Fleet ---------------- */

  function count(c) { return (c.estimated ? "≈ " : "") + fmt(c.count); }

  /* Bars of the fleet's spend per day: its width follows the panel's, so its labels keep their size. */
  function dailyBars(days, width) {
    var W = Math.max(Math.round(width || 720), 260), H = W < 500 ? 180 : 220, L = 64, R = 8, T = 10, B = 26;
    var values = days.map(function (d) { return Number(d.spent_usd); });
    var scale = ticks(Math.max.apply(null, values.concat([0.01])), 4);
    var maxY = scale[scale.length - 1].value;
    var s = svg("svg", {viewBox: "0 0 " + W + " " + H, width: W, height: H, class: "chart bars", role: "img", "aria-labelledby": "spend-title"});
    var title = svg("title", {id: "spend-title"});
    title.textContent = "The fleet's spend per day this period";
    s.appendChild(title);
    function y(v) { return T + (H - T - B) * (1 - v / maxY); }
    scale.forEach(function (t) {
      s.appendChild(svg("line", {x1: L, x2: W - R, y1: y(t.value), y2: y(t.value), class: "grid-line"}));
      var label = svg("text", {x: L - 6, y: y(t.value) + 4, "text-anchor": "end", class: "axis"});
      label.textContent = t.label;
      s.appendChild(label);
    });
    var slot = (W - L - R) / Math.max(days.length, 1);
    days.forEach(function (d, i) {
      var v = Number(d.spent_usd);
      s.appendChild(svg("rect", {x: (L + i * slot + slot * 0.15).toFixed(1), width: Math.max(slot * 0.7, 1).toFixed(1),
                                 y: y(v).toFixed(1), height: Math.max(y(0) - y(v), 0).toFixed(1), class: "bar",
                                 "data-day": d.day, "data-spent": d.spent_usd}));
    });
    [0, days.length - 1].forEach(function (i, n) {
      if (i < 0 || (n && i === 0)) return;
      var label = svg("text", {x: n ? W - R : L, y: H - 6, "text-anchor": n ? "end" : "start", class: "axis"});
      label.textContent = day(days[i].day);
      s.appendChild(label);
    });
    return s;
  }

  function renderFleet(root, data) {
    var statuses = data.statuses;
    var spend = data.spend, panel = root.querySelector('[data-panel="spend"]');
    setPanel(root, "spend", el("div", {}, [
      el("dl", {class: "figures"}, [
        el("div", {}, [el("dt", {text: "Spent " + day(spend.period_start) + " to today"}), el("dd", {"data-figure": "spent", text: money(spend.spent_usd)})]),
        el("div", {}, [el("dt", {text: "Forecast for the period (to " + day(spend.period_end) + ")"}), el("dd", {"data-figure": "forecast", text: money(spend.forecast_usd)})]),
        el("div", {}, [el("dt", {text: "Agents"}), el("dd", {"data-figure": "agents", text: (data.total_estimated ? "≈ " : "") + fmt(data.total_agents)})])
      ]),
      el("div", {class: "chart-wrap"}, [dailyBars(spend.days, panel ? panel.clientWidth : 720)]),
      el("p", {class: "muted", text: "From the usage rollups, brought up to date every five minutes."})
    ]));
    setPanel(root, "tiers", table(["Tier"].concat(statuses).concat(["Total"]), data.tiers.map(function (t) {
      return [t.tier].concat(statuses.map(function (s) { return count(t.counts[s]); })).concat([(t.estimated ? "≈ " : "") + fmt(t.total)]);
    }), "Agents by tier and status", "tiers"));
    setPanel(root, "nearest", data.budgets_nearest.length ? table(["Budget", "Used", "Remaining", "Status"], data.budgets_nearest.map(function (b) {
      var name = b.scope + " " + b.scope_id + " (" + b.window + ")";
      return [b.url ? link(b.url, name) : name, b.percent === null ? "–" : b.percent + "% of " + money(b.limit_usd), money(b.remaining_usd),
              b.refusing ? badge("critical", "Refusing calls") : badge(b.level, levelLabel(b.level))];
    }), "Budgets nearest their limits", "nearest") : empty("No budget has crossed an alert threshold this month."));
    setPanel(root, "alerts", alertList(data.open_alerts, false));
    setPanel(root, "scaling", scalingTable(data.scaling_events, true));
    bind("generated", when(data.generated_at));
  }

  /* ---------------- One agent ---------------- */

  function gauge(g) {
    var pct = g.percent === null ? 0 : Math.min(Number(g.percent), 100);
    var r = 40, cx = 50, cy = 50, len = Math.PI * r;
    var s = svg("svg", {viewBox: "0 0 100 60", class: "gauge-svg", role: "img",
                        "aria-label": g.resource_type + " " + (g.percent === null ? "no limit" : g.percent + "% used")});
    s.appendChild(svg("path", {d: "M10 50 A40 40 0 0 1 90 50", class: "gauge-track"}));
    s.appendChild(svg("path", {d: "M10 50 A40 40 0 0 1 90 50", class: "gauge-value " + g.level,
                               "stroke-dasharray": (len * pct / 100).toFixed(2) + " " + len.toFixed(2)}));
    var text = svg("text", {x: cx, y: cy - 4, "text-anchor": "middle", class: "gauge-text"});
    text.textContent = g.percent === null ? "–" : g.percent + "%";
    s.appendChild(text);
    return el("figure", {class: "gauge " + g.level, "data-resource": g.resource_type, "data-percent": g.percent === null ? "" : g.percent}, [
      s,
      el("figcaption", {}, [
        el("strong", {text: g.resource_type}), el("br"),
        el("span", {text: fmt(g.used + g.reserved) + " / " + fmt(g.limit) + " " + g.unit}), el("br"),
        badge(g.level, levelLabel(g.level)),
        g.exhaustion_at ? el("span", {class: "exhaustion", text: " Runs out ~" + when(g.exhaustion_at)}) : null
      ])
    ]);
  }

  /* The chart is drawn at the panel's own width (one SVG unit is one CSS pixel), so its labels are as
     large on a phone as on a desktop; it is drawn again when the window is resized. */
  function costChart(cost, width) {
    var W = Math.max(Math.round(width || 720), 260), H = W < 500 ? 220 : 260, L = 64, R = 12, T = 12, B = 28;
    var days = cost.days.length;
    var totals = [];
    for (var i = 0; i <= cost.today_index; i++) {
      totals.push(cost.series.reduce(function (sum, s) { return sum + Number(s.points[i] || 0); }, 0));
    }
    var scale = ticks(Math.max(Number(cost.forecast_usd || 0), Number(cost.budget_usd || 0), totals.length ? totals[totals.length - 1] : 0, 0.01), 4);
    var maxY = scale[scale.length - 1].value;
    function x(i) { return L + (W - L - R) * (days > 1 ? i / (days - 1) : 0); }
    function y(v) { return T + (H - T - B) * (1 - v / maxY); }
    var s = svg("svg", {viewBox: "0 0 " + W + " " + H, width: W, height: H, class: "chart", role: "img", "aria-labelledby": "cost-title"});
    var title = svg("title", {id: "cost-title"});
    title.textContent = "Cumulative spend this period by resource type, with budget and forecast";
    s.appendChild(title);
    scale.forEach(function (t) {
      s.appendChild(svg("line", {x1: L, x2: W - R, y1: y(t.value), y2: y(t.value), class: "grid-line"}));
      var label = svg("text", {x: L - 6, y: y(t.value) + 4, "text-anchor": "end", class: "axis"});
      label.textContent = t.label;
      s.appendChild(label);
    });
    (W < 500 ? [0, days - 1] : [0, Math.floor((days - 1) / 2), days - 1]).forEach(function (i, n, all) {
      var anchor = n === 0 ? "start" : n === all.length - 1 ? "end" : "middle";
      var label = svg("text", {x: x(i), y: H - 8, "text-anchor": anchor, class: "axis"});
      label.textContent = day(cost.days[i]);
      s.appendChild(label);
    });
    // Stacked areas, one series per resource type.
    var base = cost.series.length ? cost.series[0].points.map(function () { return 0; }) : [];
    cost.series.forEach(function (series, k) {
      var top = series.points.map(function (p, i) { return base[i] + Number(p); });
      var d = "M" + top.map(function (v, i) { return x(i).toFixed(1) + " " + y(v).toFixed(1); }).join(" L");
      d += " L" + base.map(function (v, i) { return x(i).toFixed(1) + " " + y(v).toFixed(1); }).reverse().join(" L") + " Z";
      s.appendChild(svg("path", {d: d, fill: COLORS[k % COLORS.length], class: "series area", "data-series": series.name}));
      base = top;
    });
    if (cost.budget_usd !== null) {
      s.appendChild(svg("line", {x1: L, x2: W - R, y1: y(Number(cost.budget_usd)), y2: y(Number(cost.budget_usd)),
                                 class: "series budget", "data-series": "budget"}));
    }
    var lastX = x(cost.today_index), lastY = y(totals.length ? totals[totals.length - 1] : 0);
    s.appendChild(svg("line", {x1: lastX, y1: lastY, x2: x(days - 1), y2: y(Number(cost.forecast_usd)),
                               class: "series forecast", "data-series": "forecast"}));
    var legend = el("ul", {class: "legend"}, cost.series.map(function (series, k) {
      return el("li", {}, [el("span", {class: "swatch", style: "background:" + COLORS[k % COLORS.length]}), document.createTextNode(series.name)]);
    }).concat([
      cost.budget_usd !== null ? el("li", {}, [el("span", {class: "swatch line budget-swatch"}), document.createTextNode("Budget " + money(cost.budget_usd) + " (solid line)")]) : null,
      el("li", {}, [el("span", {class: "swatch line forecast-swatch"}), document.createTextNode("Forecast " + money(cost.forecast_usd) + " by " + day(cost.days[cost.days.length - 1]) + " (dashed)")])
    ]));
    return el("div", {}, [
      el("p", {text: "Spent " + money(cost.spent_usd) + (cost.budget_usd !== null ? " of a " + money(cost.budget_usd) + " budget" : " (no budget set)")}),
      el("div", {class: "chart-wrap"}, [s]), legend
    ]);
  }

  function budgetTable(budgets) {
    if (!budgets.length) return empty("No budget applies to this agent.");
    var headers = ["Budget", "Window", "Remaining", "Limit", "Spent", "Reserved", "Window ends", "Mode", "Status"];
    var rows = budgets.map(function (b) {
      var ends = b.window_end ? when(b.window_end) : b.expires_at ? "run ends " + when(b.expires_at) : "–";
      var state = b.refusing ? badge("critical", "Refusing calls")
        : badge(b.level, levelLabel(b.level) + (b.percent === null ? "" : " · " + b.percent + "% used"));
      var cells = [b.scope + " " + b.scope_id + (b.managed ? " (monthly budget)" : ""), b.window,
        el("strong", {class: "remaining", text: money(b.remaining_usd)}),
        money(b.limit_usd) + (Number(b.rollover_usd) ? " + " + money(b.rollover_usd) + " rollover" : ""),
        money(b.spent_usd), money(b.reserved_usd), ends, b.mode, state];
      return el("tr", {"data-budget": String(b.id), "data-remaining": b.remaining_usd, class: b.refusing ? "refusing" : ""},
        cells.map(function (c, i) { return cell(headers[i], c); }));
    });
    var thead = el("thead", {}, [el("tr", {}, headers.map(function (h) { return el("th", {scope: "col", text: h}); }))]);
    return el("table", {class: "budgets stack"}, [el("caption", {class: "sr-only", text: "Budgets that apply to this agent"}), thead, el("tbody", {}, rows)]);
  }

  function outlook(o) {
    var box = document.getElementById("outlook");
    if (!box || !o) return;
    box.className = "outlook " + o.level;
    box.setAttribute("data-level", o.level);
    bind("outlook-label", (o.level === "critical" ? "Over budget" : o.level === "warning" ? "Near budget" : "On track") + ":");
    bind("outlook-message", o.message);
  }

  function rangeTable(range) {
    if (!range) return empty("");
    // A column per resource type on a wide screen; on a phone they fold into one "By type" line per day.
    var headers = ["Day", "Total"].concat(range.resource_types).concat(["By type"]);
    var rows = range.days.slice().reverse().map(function (d) {
      var byType = range.resource_types.filter(function (code) { return Number(d.by_type[code]); })
        .map(function (code) { return code + " " + money(d.by_type[code]); }).join(" · ") || "–";
      return [day(d.day), money(d.total_usd)].concat(range.resource_types.map(function (code) { return money(d.by_type[code]); })).concat([byType]);
    });
    var spend = table(headers, rows, "Spend per day by resource type", "range");
    spend.querySelectorAll("tr").forEach(function (tr) {
      var cells = tr.children;
      for (var i = 2; i < cells.length - 1; i++) cells[i].classList.add("per-type");
      cells[cells.length - 1].classList.add("by-type");
    });
    return el("div", {}, [
      el("p", {text: "Spent " + money(range.total_usd) + " from " + day(range.since) + " to " + day(range.until) + ", newest day first."}),
      spend
    ]);
  }

  function performance(p) {
    var rows = [["Executions (" + p.window_hours + " h)", fmt(p.executions)], ["p50 duration", p.p50_ms === null ? "–" : p.p50_ms + " ms"],
                ["p95 duration", p.p95_ms === null ? "–" : p.p95_ms + " ms"], ["Throughput", p.throughput_per_hour === null ? "–" : p.throughput_per_hour + " / hour"],
                ["Error rate", p.error_rate_percent === null ? "–" : p.error_rate_percent + "%"], ["Efficiency score", p.efficiency_score === null ? "–" : p.efficiency_score + " / 100"]];
    return el("dl", {class: "stats"}, rows.reduce(function (acc, r) { return acc.concat([el("dt", {text: r[0]}), el("dd", {text: r[1]})]); }, []));
  }

  function alertList(alerts, withActions) {
    if (!alerts.length) return empty("No open alerts.");
    return el("ul", {class: "alerts"}, alerts.map(function (a) {
      var item = el("li", {class: "alert " + a.severity, "data-alert": String(a.id)}, [
        badge(a.severity === "critical" ? "critical" : a.severity === "warning" ? "warning" : "ok", a.severity.toUpperCase()),
        el("strong", {text: " " + a.title}), withActions || !a.url ? null : el("span", {text: " · "}), withActions || !a.url ? null : link(a.url, a.agent_id),
        el("div", {class: "muted", text: a.message + " · " + when(a.created_at)})
      ]);
      if (withActions) item.appendChild(actionButton("acknowledge", {alert_id: a.id}, "Acknowledge", "Acknowledge alert: " + a.title));
      return item;
    }));
  }

  function scalingTable(events, withAgent) {
    if (!events.length) return empty("No scaling events yet.");
    return table((withAgent ? ["Agent"] : []).concat(["When", "Change", "Before", "After", "Trigger", "Reason"]), events.map(function (e) {
      return (withAgent ? [link(e.url, e.agent_id)] : []).concat([when(e.created_at), e.kind + " " + e.direction + (e.resource_type ? " (" + e.resource_type + ")" : ""),
        fmt(e.before), fmt(e.after), e.trigger, e.reason]);
    }), "Scaling events");
  }

  function recommendations(items) {
    if (!items.length) return empty("Nothing to recommend right now.");
    return el("ol", {class: "recs"}, items.map(function (r) {
      var li = el("li", {"data-recommendation": r.id || ""}, [
        badge(r.priority === "high" ? "critical" : r.priority === "medium" ? "warning" : "ok", r.priority.toUpperCase()),
        el("strong", {text: " " + r.type.replace(/_/g, " ")}),
        el("span", {text: Number(r.expected_monthly_saving_usd) < 0
          ? " · costs " + money(String(-Number(r.expected_monthly_saving_usd))) + " more / month"
          : " · saves " + money(r.expected_monthly_saving_usd) + " / month"}),
        el("div", {class: "muted", text: r.rationale})
      ]);
      if (r.safe) li.appendChild(actionButton("apply_recommendation", {recommendation_id: r.id}, "Apply", "Apply recommendation: " + r.type));
      return li;
    }));
  }

  function controls(agent) {
    var up = actionButton("scale", {direction: "up"}, "Scale up", "Scale up by one instance");
    var down = actionButton("scale", {direction: "down"}, "Scale down", "Scale down by one instance");
    var toggle = el("input", {type: "checkbox", id: "autoscaling-toggle", name: "enabled"});
    toggle.checked = !!agent.autoscaling_enabled;
    toggle.addEventListener("change", function () { postAction("autoscaling", toggle.checked ? {enabled: "on"} : {}); });
    return el("div", {}, [
      el("p", {text: "Instances: " + agent.instance_count + " (min " + agent.min_instances + ", max " + agent.max_instances + ")"}),
      el("div", {class: "buttons"}, [up, down]),
      el("p", {}, [toggle, el("label", {for: "autoscaling-toggle", text: " Auto-scaling " + (agent.autoscaling_enabled ? "on" : "off")})])
    ]);
  }

  function actionButton(name, fields, label, ariaLabel) {
    var button = el("button", {type: "button", class: "btn", "aria-label": ariaLabel || label, "data-action": name, text: label});
    button.addEventListener("click", function () { button.disabled = true; postAction(name, fields); });
    return button;
  }

  var monitorRoot = null;

  function renderMonitor(root, data) {
    var a = data.agent;
    bind("agent-summary", a.tier + " tier · " + a.status + (a.status_reason ? " (" + a.status_reason + ")" : "") + " · " + a.instance_count + " instance(s)");
    bind("generated", when(data.generated_at));
    var gauges = el("div", {class: "gauge-row"}, data.gauges.map(gauge));
    setPanel(root, "gauges", gauges);
    setPanel(root, "budgets", budgetTable(data.budgets || []));
    var costPanel = root.querySelector('[data-panel="cost"]');
    setPanel(root, "cost", costChart(data.cost, costPanel ? costPanel.clientWidth : 720));
    setPanel(root, "range", rangeTable(data.range));
    outlook(data.outlook);
    setPanel(root, "performance", performance(data.performance));
    setPanel(root, "controls", controls(a));
    setPanel(root, "alerts", alertList(data.alerts, true));
    setPanel(root, "recommendations", recommendations(data.recommendations));
    setPanel(root, "scaling", scalingTable(data.scaling_events, false));
  }

  function csrfToken() {
    var input = document.querySelector("#csrf-holder input[name=csrfmiddlewaretoken]");
    return input ? input.value : "";
  }

  function postAction(name, fields) {
    var root = monitorRoot;
    var body = new URLSearchParams();
    body.set("agent", root.getAttribute("data-agent"));
    Object.keys(fields || {}).forEach(function (k) { body.set(k, fields[k]); });
    return fetch(root.getAttribute("data-action").replace("NAME", name), {
      method: "POST", credentials: "same-origin", body: body,
      headers: {"X-CSRFToken": csrfToken(), "Accept": "application/json"}
    }).then(function (response) { return response.json(); }).then(function (result) {
      status(result.message);
      return refresh(root, renderMonitor);
    }).catch(function () { status("The action could not be sent; try again."); });
  }

  function refresh(root, render) {
    return fetch(root.getAttribute("data-endpoint"), {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (response) { if (!response.ok) throw new Error(response.status); return response.json(); })
      .then(function (data) { render(root, data); })
      .catch(function () { status("Could not refresh the figures; retrying."); });
  }

  var lastData = null;

  function start(rootId, dataId, render) {
    var root = document.getElementById(rootId);
    var initial = document.getElementById(dataId);
    if (!root || !initial) return false;
    var draw = function (r, data) { lastData = data; render(r, data); };
    draw(root, JSON.parse(initial.textContent));
    window.setInterval(function () { if (!document.hidden) refresh(root, draw); }, POLL_MS);
    var resizing = null, width = window.innerWidth;
    window.addEventListener("resize", function () {
      if (window.innerWidth === width) return;
      width = window.innerWidth;
      window.clearTimeout(resizing);
      resizing = window.setTimeout(function () { if (lastData) render(root, lastData); }, 150);
    });
    return root;
  }

  /* The agent picker suggests ids as they are typed (the server answers at most twenty). */
  function picker() {
    var form = document.querySelector("form.picker");
    if (!form) return;
    var input = form.querySelector("input[name=agent]"), list = document.getElementById("agent-options"), pending = null;
    input.addEventListener("input", function () {
      window.clearTimeout(pending);
      var text = input.value.trim();
      if (!text) return;
      pending = window.setTimeout(function () {
        fetch(form.getAttribute("data-suggest") + "?q=" + encodeURIComponent(text), {credentials: "same-origin", headers: {"Accept": "application/json"}})
          .then(function (response) { return response.ok ? response.json() : {agents: []}; })
          .then(function (result) { list.replaceChildren.apply(list, result.agents.map(function (id) { return el("option", {value: id}); })); })
          .catch(function () {});
      }, 200);
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    picker();
    monitorRoot = start("monitor", "monitor-data", renderMonitor);
    if (!monitorRoot) start("fleet", "fleet-data", renderFleet);
  });
})();
