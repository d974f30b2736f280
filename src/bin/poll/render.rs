//! A frame from `/stats`: the summary (instances, forks, the commands running and streamed),
//! the model line, the warm pools, the resource bars and the image lines (the instance table
//! is `table.rs`).

use super::*;

/// What to draw and for whom.
pub(crate) struct View {
    pub(crate) url: String,
    pub(crate) list: bool,
    pub(crate) raw: bool,
    pub(crate) filters: Filters,
}

pub(crate) fn pretty(stats: &Value) -> String {
    serde_json::to_string_pretty(stats).unwrap_or_else(|_| stats.to_string())
}

/// The whole frame: summary, and with `--list` the instance table, fitted to `screen`.
pub(crate) fn render(stats: &Value, view: &View, screen: Screen) -> Vec<String> {
    let mut lines = summary(stats, view, screen.width);
    if view.list {
        lines.push(String::new());
        let budget = screen.height.saturating_sub(lines.len());
        lines.extend(instance_table(stats, view, screen.width, budget));
    }
    screen.fit(lines)
}

/// The label column of the summary.
pub(crate) const LABEL_WIDTH: usize = 10;

pub(crate) fn labelled(label: &str, text: &str) -> String {
    format!("{label:<LABEL_WIDTH$} {text}")
}

/// Server, instance counts, every enforced resource as a bar, instances per image.
pub(crate) fn summary(stats: &Value, view: &View, width: usize) -> Vec<String> {
    let mut lines = Vec::new();

    let mut head = vec![view.url.clone()];
    if let Some(runner) = stats.get("runner").and_then(Value::as_str) {
        head.push(format!("{runner} runner"));
    }
    if let Some(uptime) = number(stats, "uptime_s") {
        head.push(format!("up {}", duration_text(uptime)));
    }
    if let Some(server_time) = number(stats, "server_time") {
        head.push(utc_text(server_time));
    }
    lines.push(labelled("arservice", &head.join(" · ")));

    let active = count(stats, "active_instances");
    let total = count(stats, "total_instances");
    let mut counts = match (view.filters.describe(), active, total) {
        (Some(filters), Some(active), Some(total)) => {
            vec![format!("{active} of {total} running match {filters}")]
        }
        (Some(filters), Some(active), None) => vec![format!("{active} match {filters}")],
        (None, Some(active), _) | (None, None, Some(active)) => vec![format!("{active} running")],
        _ => vec!["running: unknown".to_string()],
    };
    if let Some(starting) = count(stats, "starting_instances").filter(|&starting| starting > 0) {
        counts.push(format!("{starting} starting"));
    }
    let dead = stats
        .get("instances")
        .and_then(Value::as_array)
        .map_or(0, |rows| {
            rows.iter()
                .filter(|row| row.get("state").and_then(Value::as_str) == Some("dead"))
                .count()
        });
    if dead > 0 {
        counts.push(format!("{dead} dead"));
    }
    if let Some(started) = count(stats, "instances_started") {
        counts.push(format!("{started} started since launch"));
    }
    if let Some(adopted) = count(stats, "instances_adopted").filter(|&adopted| adopted > 0) {
        counts.push(format!("{adopted} adopted after a restart"));
    }
    if let Some(forked) = count(stats, "instances_forked").filter(|&forked| forked > 0) {
        counts.push(format!("{forked} forked"));
    }
    match count(stats, "forks_failed") {
        Some(1) => counts.push("1 fork failed".to_string()),
        Some(failed) if failed > 1 => counts.push(format!("{failed} forks failed")),
        _ => {}
    }
    lines.push(labelled("instances", &counts.join(" · ")));
    lines.extend(commands_line(stats));
    lines.extend(model_line(stats));
    lines.extend(runs_line(stats));
    lines.extend(pool_lines(stats));

    lines.extend(resource_lines(stats, width));
    let image_rows = if view.list {
        IMAGE_ROWS_WITH_LIST
    } else {
        IMAGE_ROWS
    };
    lines.extend(image_lines(stats, width, image_rows));
    lines
}

/// Commands running now and how many of them stream their output, and the streamed commands
/// since launch; once there is something to say. The counts running are the server's sums
/// (over the instances listed), else the rows' own (an older server).
pub(crate) fn commands_line(stats: &Value) -> Option<String> {
    let rows = stats.get("instances").and_then(Value::as_array);
    let running = |key: &str| {
        count(stats, key).unwrap_or_else(|| {
            rows.into_iter()
                .flatten()
                .filter_map(|row| count(row, key))
                .sum()
        })
    };
    let (commands, streams) = (running("running_cmds"), running("running_streams"));
    let streamed = count(stats, "streamed_commands");
    if commands == 0 && streams == 0 && streamed.unwrap_or(0) == 0 {
        return None;
    }
    let mut parts = vec![format!("{commands} running")];
    if streams > 0 || streamed.is_some() {
        parts.push(format!("{streams} streaming"));
    }
    if let Some(streamed) = streamed {
        parts.push(format!("{streamed} streamed since launch"));
    }
    Some(labelled("commands", &parts.join(" · ")))
}

/// One line per warm pool (`/stats` `pools`), when there are any: its preset, its sandboxes
/// idle and starting against its size, what they hold (counted in the resource bars), and
/// its counters since launch (those that are not zero, beyond `taken` and `missed`).
pub(crate) fn pool_lines(stats: &Value) -> Vec<String> {
    let Some(pools) = stats.get("pools").and_then(Value::as_object) else {
        return Vec::new();
    };
    let width = pools
        .keys()
        .map(|name| name.chars().count())
        .max()
        .unwrap_or(0);
    pools
        .iter()
        .enumerate()
        .map(|(index, (name, pool))| {
            let of = |key| count(pool, key).unwrap_or(0);
            let mut parts = vec![format!(
                "{name:<width$}  {} idle, {} starting of {}",
                of("idle"),
                of("starting"),
                of("size")
            )];
            let held: Vec<String> = pool
                .get("resources")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .filter_map(|(key, amount)| {
                    Some(format!("{} {key}", amount_text(amount.as_f64()?)))
                })
                .collect();
            if !held.is_empty() {
                parts.push(format!("pooled {}", held.join(", ")));
            }
            parts.push(format!("{} taken, {} missed", of("taken"), of("missed")));
            for key in ["evicted", "died", "failed"] {
                if of(key) > 0 {
                    parts.push(format!("{} {key}", of(key)));
                }
            }
            labelled(if index == 0 { "pools" } else { "" }, &parts.join(" · "))
        })
        .collect()
}

/// The model gateway's totals, when it is on: calls, tokens, cost, and the limits.
pub(crate) fn model_line(stats: &Value) -> Option<String> {
    let model = stats.get("model").filter(|model| model.is_object())?;
    let whole = |key: &str| model.get(key).and_then(Value::as_u64).unwrap_or(0);
    let mut parts = vec![
        format!("{} calls", whole("calls")),
        format!(
            "{} in / {} out tokens",
            whole("input_tokens"),
            whole("output_tokens")
        ),
        format!(
            "${:.4}",
            model.get("cost_usd").and_then(Value::as_f64).unwrap_or(0.0)
        ),
    ];
    let limits = model.get("limits");
    if let Some(cost) = limits
        .and_then(|l| l.get("cost_usd"))
        .and_then(Value::as_f64)
    {
        parts.push(format!("cost limit ${cost}"));
    }
    if let Some(calls) = limits.and_then(|l| l.get("calls")).and_then(Value::as_u64) {
        parts.push(format!("call limit {calls}"));
    }
    if whole("failed_calls") > 0 {
        parts.push(format!("{} failed", whole("failed_calls")));
    }
    Some(labelled("model", &parts.join(" · ")))
}

/// The rollout ledger, from a server that keeps one, once it has something to say: runs closed,
/// and over open and closed runs the timeouts, infra failures (since launch) and CPU time.
pub(crate) fn runs_line(stats: &Value) -> Option<String> {
    let closed = stats
        .get("closed_runs")
        .filter(|closed| closed.is_object())?;
    let rows = stats.get("instances").and_then(Value::as_array);
    let open = |key: &str| -> f64 {
        rows.into_iter()
            .flatten()
            .filter_map(|row| number(row, key))
            .sum()
    };
    let timeouts = count(closed, "timeouts").unwrap_or(0) + open("commands_timed_out") as u64;
    let cpu = number(closed, "cpu_s").unwrap_or(0.0) + open("cpu_s");
    let infra = count(stats, "infra_failures").unwrap_or(0);
    let runs = count(closed, "runs").unwrap_or(0);
    if runs == 0 && timeouts == 0 && infra == 0 && cpu == 0.0 {
        return None;
    }
    let mut parts = vec![
        format!("{runs} closed"),
        format!("{timeouts} timeouts"),
        format!("{infra} infra failures"),
    ];
    if cpu > 0.0 {
        parts.push(format!("{} CPU", duration_text(cpu)));
    }
    Some(labelled("runs", &parts.join(" · ")))
}

/// One line per enforced resource (each key of `max_resources`): bar, allocated / max, percent;
/// the bar gets shorter on a narrow terminal.
pub(crate) fn resource_lines(stats: &Value, width: usize) -> Vec<String> {
    let Some(max) = stats.get("max_resources").and_then(Value::as_object) else {
        return Vec::new();
    };
    let allocated = stats.get("allocated_resources").and_then(Value::as_object);
    let available = stats.get("available_resources").and_then(Value::as_object);
    let mut keys: Vec<&String> = max.keys().collect();
    keys.sort_by_key(|key| (key.as_str() != INSTANCES, key.as_str()));
    let rows: Vec<(String, Option<f64>, f64)> = keys
        .into_iter()
        .map(|key| (key, &max[key]))
        .filter_map(|(key, limit)| {
            let limit = limit.as_f64()?;
            let used = allocated
                .and_then(|allocated| allocated.get(key))
                .and_then(Value::as_f64)
                .or_else(|| {
                    let left = available?.get(key)?.as_f64()?;
                    Some(limit - left)
                });
            Some((key.clone(), used, limit))
        })
        .collect();
    let key_width = rows
        .iter()
        .map(|(key, _, _)| key.chars().count())
        .max()
        .unwrap_or(0);
    let amount_width = rows
        .iter()
        .map(|(_, used, limit)| {
            let used = used.map_or(1, |used| amount_text(used).len());
            used.max(amount_text(*limit).len())
        })
        .max()
        .unwrap_or(0);
    // Label, key, bar, "used / max", percent, and the gaps between them.
    let fixed = LABEL_WIDTH + 1 + key_width + 2 + 2 + (2 * amount_width + 3) + 2 + PERCENT_WIDTH;
    let bar_cells = width.saturating_sub(fixed).clamp(MIN_BAR_WIDTH, BAR_WIDTH);
    rows.iter()
        .enumerate()
        .map(|(index, (key, used, limit))| {
            let label = if index == 0 { "resources" } else { "" };
            let (bar, used_text, percent) = match used {
                Some(used) => {
                    let share = if *limit > 0.0 { (used / limit).clamp(0.0, 1.0) } else { 1.0 };
                    let percent = if *limit > 0.0 {
                        format!("{:>3.0}%", used / limit * 100.0)
                    } else {
                        "   -".to_string()
                    };
                    (bar_text(share, bar_cells), amount_text(*used), percent)
                }
                None => (bar_text(0.0, bar_cells), "?".to_string(), "   ?".to_string()),
            };
            labelled(
                label,
                &format!(
                    "{key:<key_width$}  {bar}  {used_text:>amount_width$} / {:<amount_width$}  {percent}",
                    amount_text(*limit)
                ),
            )
        })
        .collect()
}

/// A bar of `cells` cells, `share` of them filled.
pub(crate) fn bar_text(share: f64, cells: usize) -> String {
    let filled = ((share * cells as f64).round() as usize).min(cells);
    format!("{}{}", "█".repeat(filled), "░".repeat(cells - filled))
}

/// The largest images by instance count, long names cut in the middle; the rest on one line.
pub(crate) fn image_lines(stats: &Value, width: usize, rows: usize) -> Vec<String> {
    let Some(counts) = stats.get("container_counts").and_then(Value::as_object) else {
        return Vec::new();
    };
    let mut images: Vec<(&str, u64)> = counts
        .iter()
        .map(|(image, count)| (image.as_str(), count.as_u64().unwrap_or(0)))
        .collect();
    images.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let count_width = images
        .first()
        .map_or(1, |(_, count)| count.to_string().len());
    let name_width = width
        .saturating_sub(LABEL_WIDTH + 1 + count_width + 2)
        .max(MIN_NAME_WIDTH);
    let mut lines: Vec<String> = images
        .iter()
        .take(rows)
        .enumerate()
        .map(|(index, (image, count))| {
            let label = if index == 0 { "images" } else { "" };
            let image = cut_middle(image, name_width);
            labelled(label, &format!("{count:>count_width$}  {image}"))
        })
        .collect();
    if images.len() > rows {
        let rest = &images[rows..];
        let instances: u64 = rest.iter().map(|(_, count)| count).sum();
        lines.push(labelled(
            "",
            &format!("{instances:>count_width$}  in {} more images", rest.len()),
        ));
    }
    lines
}
