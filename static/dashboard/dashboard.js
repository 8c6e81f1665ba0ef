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

  function fmt(n) { return n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"); }
  function money(s) { return s === null || s === undefined ? "–" : "$" + Number(s).toLocaleString("en-US", {minimumFractionDigits: 2, maximumFractionDigits: 2}); }
  function when(iso) { return iso ? iso.replace("T", " ").slice(0, 16) + " UTC" : "–"; }
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

  function table(headers, rows, caption) {
    var thead = el("thead", {}, [el("tr", {}, headers.map(function (h) { return el("th", {scope: "col", text: h}); }))]);
    var tbody = el("tbody", {}, rows.map(function (cells) {
      return el("tr", {}, cells.map(function (c) { return c instanceof Node ? el("td", {}, [c]) : el("td", {text: c}); }));
    }));
    return el("table", {}, [caption ? el("caption", {class: "sr-only", text: caption}) : null, thead, tbody]);
  }
  function empty(text) { return el("p", {class: "muted", text: text}); }
  function link(href, text) { return el("a", {href: href, text: text}); }
  function badge(level, text) { return el("span", {class: "badge " + level, text: text}); }

  /* ---------------- Fleet ---------------- */

  function renderFleet(root, data) {
    var statuses = data.statuses;
    setPanel(root, "tiers", table(["Tier"].concat(statuses).concat(["Total"]), data.tiers.map(function (t) {
      return [t.tier].concat(statuses.map(function (s) { return String(t.counts[s]); })).concat([String(t.total)]);
    }), "Agents by tier and status"));
    setPanel(root, "top", data.top_spenders.length ? table(["Agent", "Spent"], data.top_spenders.map(function (r) {
      return [link(r.url, r.agent_id), money(r.spent_usd)];
    })) : empty("No spend this period."));
    setPanel(root, "nearest", data.nearest_limits.length ? table(["Agent", "Most used resource", "Budget", "Level"], data.nearest_limits.map(function (r) {
      return [link(r.url, r.agent_id), r.resource_percent === null ? "–" : r.resource_type + " " + r.resource_percent + "%",
              r.budget_percent === null ? "–" : r.budget_percent + "%", badge(r.level, levelLabel(r.level))];
    })) : empty("No quotas opened yet."));
    setPanel(root, "alerts", alertList(data.open_alerts, false));
    setPanel(root, "scaling", scalingTable(data.scaling_events, true));
    bind("generated", new Date().toISOString().slice(11, 19) + " UTC");
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

  function costChart(cost) {
    var W = 720, H = 260, L = 56, R = 12, T = 12, B = 28;
    var days = cost.days.length;
    var totals = [];
    for (var i = 0; i <= cost.today_index; i++) {
      totals.push(cost.series.reduce(function (sum, s) { return sum + Number(s.points[i] || 0); }, 0));
    }
    var maxY = Math.max(Number(cost.forecast_usd || 0), Number(cost.budget_usd || 0), totals.length ? totals[totals.length - 1] : 0, 0.01) * 1.1;
    function x(i) { return L + (W - L - R) * (days > 1 ? i / (days - 1) : 0); }
    function y(v) { return T + (H - T - B) * (1 - v / maxY); }
    var s = svg("svg", {viewBox: "0 0 " + W + " " + H, class: "chart", role: "img", "aria-labelledby": "cost-title",
                        preserveAspectRatio: "xMidYMid meet"});
    var title = svg("title", {id: "cost-title"});
    title.textContent = "Cumulative spend this period by resource type, with budget and forecast";
    s.appendChild(title);
    [0, 0.25, 0.5, 0.75, 1].forEach(function (f) {
      var v = maxY * f;
      s.appendChild(svg("line", {x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid-line"}));
      var label = svg("text", {x: L - 6, y: y(v) + 4, "text-anchor": "end", class: "axis"});
      label.textContent = "$" + v.toFixed(v < 10 ? 2 : 0);
      s.appendChild(label);
    });
    [0, Math.floor((days - 1) / 2), days - 1].forEach(function (i, n) {
      var label = svg("text", {x: x(i), y: H - 8, "text-anchor": ["start", "middle", "end"][n], class: "axis"});
      label.textContent = cost.days[i].slice(5);
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
      el("li", {}, [el("span", {class: "swatch line forecast-swatch"}), document.createTextNode("Forecast " + money(cost.forecast_usd) + " at period end (dashed)")])
    ]));
    return el("div", {}, [
      el("p", {text: "Spent " + money(cost.spent_usd) + (cost.budget_usd !== null ? " of a " + money(cost.budget_usd) + " budget" : " (no budget set)")}),
      el("div", {class: "chart-wrap"}, [s]), legend
    ]);
  }

  /* Dollars to the cent, or finer below a dollar (a run's $0.004 left is not "$0.00"). */
  function dollars(s) {
    if (s === null || s === undefined) return "–";
    var n = Number(s);
    return (n < 0 ? "−$" : "$") + Math.abs(n).toLocaleString("en-US", {minimumFractionDigits: 2, maximumFractionDigits: Math.abs(n) < 1 ? 6 : 2});
  }

  function budgetTable(budgets) {
    if (!budgets.length) return empty("No budget applies to this agent.");
    var headers = ["Budget", "Window", "Remaining", "Limit", "Spent", "Reserved", "Window ends", "Mode", "Status"];
    var rows = budgets.map(function (b) {
      var ends = b.window_end ? when(b.window_end) : b.expires_at ? "run ends " + when(b.expires_at) : "–";
      var state = b.refusing ? badge("critical", "Refusing calls")
        : badge(b.level, levelLabel(b.level) + (b.percent === null ? "" : " · " + b.percent + "% used"));
      var cells = [b.scope + " " + b.scope_id + (b.managed ? " (monthly budget)" : ""), b.window,
        el("strong", {class: "remaining", text: dollars(b.remaining_usd)}),
        dollars(b.limit_usd) + (Number(b.rollover_usd) ? " + " + dollars(b.rollover_usd) + " rollover" : ""),
        dollars(b.spent_usd), dollars(b.reserved_usd), ends, b.mode, state];
      return el("tr", {"data-budget": String(b.id), "data-remaining": b.remaining_usd, class: b.refusing ? "refusing" : ""},
        cells.map(function (c) { return c instanceof Node ? el("td", {}, [c]) : el("td", {text: c}); }));
    });
    var thead = el("thead", {}, [el("tr", {}, headers.map(function (h) { return el("th", {scope: "col", text: h}); }))]);
    return el("table", {class: "budgets"}, [el("caption", {class: "sr-only", text: "Budgets that apply to this agent"}), thead, el("tbody", {}, rows)]);
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
    setPanel(root, "cost", costChart(data.cost));
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

  function start(rootId, dataId, render) {
    var root = document.getElementById(rootId);
    var initial = document.getElementById(dataId);
    if (!root || !initial) return false;
    render(root, JSON.parse(initial.textContent));
    window.setInterval(function () { if (!document.hidden) refresh(root, render); }, POLL_MS);
    return root;
  }

  document.addEventListener("DOMContentLoaded", function () {
    monitorRoot = start("monitor", "monitor-data", renderMonitor);
    if (!monitorRoot) start("fleet", "fleet-data", renderFleet);
  });
})();
