//! The instance table: one row per instance, sorted, its columns shrunk or dropped to fit the
//! width.

use super::*;

/// One instance as the table shows it.
#[derive(Debug)]
pub(crate) struct Row {
    pub(crate) run_id: String,
    pub(crate) image: String,
    pub(crate) kind: String,
    pub(crate) age_s: Option<f64>,
    /// Since the last command; `None` when none ran yet (or the server does not say).
    pub(crate) idle_s: Option<f64>,
    /// The sort key: since the last command, or since the start when none ran yet.
    pub(crate) quiet_s: f64,
    pub(crate) num_cmd: Option<u64>,
    pub(crate) state: String,
    /// The `run_id` it was forked from; `None` for a start (or a server that does not say).
    pub(crate) forked_from: Option<String>,
}

impl Row {
    pub(crate) fn of(item: &Value, now: f64) -> Row {
        let config = item.get("environment_config");
        let run_id = text(item.get("run_id")).unwrap_or_else(|| "?".to_string());
        let image = text(item.get("container_image"))
            .or_else(|| text(item.get("container_name")))
            .or_else(|| text(config.and_then(|config| config.get("image"))))
            .unwrap_or_else(|| "?".to_string());
        let kind = text(item.get("container_type"))
            .or_else(|| text(config.and_then(|config| config.get("container_type"))))
            .unwrap_or_else(|| "-".to_string());
        let created_at = number(item, "created_at");
        let updated_at = number(item, "updated_at");
        let num_cmd = item.get("num_cmd").and_then(Value::as_u64);
        let running = count(item, "running_cmds").unwrap_or(0);
        let streams = count(item, "running_streams").unwrap_or(0).min(running);
        let knows_activity = item.get("updated_at").is_some() || num_cmd.is_some();
        let state = match item.get("state").and_then(Value::as_str) {
            Some(state) if state != "running" => state.to_string(),
            _ if streams > 0 && streams == running && running > 1 => format!("streaming {running}"),
            _ if streams > 0 && streams == running => "streaming".to_string(),
            _ if streams > 0 => format!("busy {running}, {streams} streaming"),
            _ if running > 1 => format!("busy {running}"),
            _ if running == 1 => "busy".to_string(),
            _ if !knows_activity => "-".to_string(),
            _ if updated_at.is_none() && num_cmd.unwrap_or(0) == 0 => "unused".to_string(),
            _ => "idle".to_string(),
        };
        let since = |time: f64| (now - time).max(0.0);
        Row {
            run_id,
            image,
            kind,
            age_s: created_at.map(since),
            idle_s: updated_at.map(since),
            quiet_s: updated_at.or(created_at).map_or(f64::NEG_INFINITY, since),
            num_cmd,
            state,
            forked_from: text(item.get("forked_from")),
        }
    }

    pub(crate) fn cells(&self) -> [String; COLUMNS.len()] {
        [
            self.run_id.clone(),
            self.forked_from.clone().unwrap_or_else(|| "-".to_string()),
            self.image.clone(),
            self.kind.clone(),
            self.age_s.map_or_else(|| "-".to_string(), duration_text),
            match (self.idle_s, self.num_cmd) {
                (Some(idle), _) => duration_text(idle),
                (None, Some(_)) => "never".to_string(),
                (None, None) => "-".to_string(),
            },
            self.num_cmd
                .map_or_else(|| "-".to_string(), |count| count.to_string()),
            self.state.clone(),
        ]
    }
}

/// Longest quiet first (a stuck or forgotten instance is at the top), then oldest first.
pub(crate) fn sort_rows(rows: &mut [Row]) {
    rows.sort_by(|a, b| {
        b.quiet_s
            .total_cmp(&a.quiet_s)
            .then_with(|| b.age_s.unwrap_or(0.0).total_cmp(&a.age_s.unwrap_or(0.0)))
            .then_with(|| a.run_id.cmp(&b.run_id))
    });
}

/// A column of the instance table.
pub(crate) struct Column {
    pub(crate) title: &'static str,
    /// Right-aligned (numbers and durations).
    pub(crate) right: bool,
}

impl Column {
    pub(crate) const fn left(title: &'static str) -> Column {
        Column {
            title,
            right: false,
        }
    }

    pub(crate) const fn right(title: &'static str) -> Column {
        Column { title, right: true }
    }
}

pub(crate) const COLUMNS: [Column; 8] = [
    Column::left("RUN ID"),
    Column::left("FORK OF"),
    Column::left("IMAGE"),
    Column::left("TYPE"),
    Column::right("AGE"),
    Column::right("IDLE"),
    Column::right("CMDS"),
    Column::left("STATE"),
];

/// Indices into [`COLUMNS`].
pub(crate) const RUN_ID: usize = 0;
pub(crate) const FORK_OF: usize = 1;
pub(crate) const IMAGE: usize = 2;
pub(crate) const TYPE: usize = 3;
pub(crate) const AGE: usize = 4;
pub(crate) const IDLE: usize = 5;
pub(crate) const CMDS: usize = 6;
pub(crate) const STATE: usize = 7;

/// Columns cut in the middle (down to [`MIN_NAME_WIDTH`]) when the table is too wide, first first.
pub(crate) const SHRINK_ORDER: [usize; 3] = [IMAGE, FORK_OF, RUN_ID];

/// Columns dropped, first first, when cutting names is not enough; the run id always stays.
pub(crate) const DROP_ORDER: [usize; 7] = [TYPE, CMDS, FORK_OF, IMAGE, AGE, STATE, IDLE];

/// The table of instances in at most `budget` lines: header, rows, and how many did not fit.
pub(crate) fn instance_table(
    stats: &Value,
    view: &View,
    width: usize,
    budget: usize,
) -> Vec<String> {
    let items = stats
        .get("instances")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    if items.is_empty() {
        let text = if view.filters.describe().is_some() {
            "no instance matches the filters"
        } else {
            "no instances"
        };
        return vec![text.to_string()];
    }
    let now = number(stats, "server_time").unwrap_or_else(epoch_now);
    let mut rows: Vec<Row> = items.iter().map(|item| Row::of(item, now)).collect();
    sort_rows(&mut rows);

    // The header, then rows; when not all fit, the last line says how many more there are.
    let shown = if rows.len() < budget {
        rows.len()
    } else {
        budget.saturating_sub(2)
    };
    let cells: Vec<[String; COLUMNS.len()]> = rows.iter().take(shown).map(Row::cells).collect();
    // FORK OF only when a row shown is a fork.
    let mut columns = [true; COLUMNS.len()];
    columns[FORK_OF] = rows.iter().take(shown).any(|row| row.forked_from.is_some());
    let widths = column_widths(&cells, width, columns);

    let line = |row: [&str; COLUMNS.len()]| {
        let cells: Vec<String> = COLUMNS
            .iter()
            .zip(widths)
            .zip(row)
            .filter_map(|((column, width), cell)| {
                let width = width?;
                let cell = cut_middle(cell, width);
                Some(if column.right {
                    format!("{cell:>width$}")
                } else {
                    format!("{cell:<width$}")
                })
            })
            .collect();
        cells.join(&" ".repeat(COLUMN_GAP)).trim_end().to_string()
    };
    let mut lines = vec![line(COLUMNS.map(|column| column.title))];
    lines.extend(
        cells
            .iter()
            .map(|row| line(row.each_ref().map(String::as_str))),
    );
    let hidden = rows.len() - shown;
    if hidden > 0 {
        lines.push(format!(
            "{ELLIPSIS} {hidden} more instances (narrow with --run-id / --container)"
        ));
    }
    lines
}

/// Each column's width, or `None` for a column dropped to fit `width` or not in `columns`:
/// natural widths when they fit; else names cut in the middle; else columns dropped in
/// [`DROP_ORDER`].
pub(crate) fn column_widths(
    rows: &[[String; COLUMNS.len()]],
    width: usize,
    columns: [bool; COLUMNS.len()],
) -> [Option<usize>; COLUMNS.len()] {
    let natural: [usize; COLUMNS.len()] = std::array::from_fn(|index| {
        let longest = rows
            .iter()
            .map(|row| row[index].chars().count())
            .max()
            .unwrap_or(0);
        longest.max(COLUMNS[index].title.len())
    });
    let total = |widths: &[Option<usize>]| {
        let shown: Vec<usize> = widths.iter().flatten().copied().collect();
        shown.iter().sum::<usize>() + COLUMN_GAP * shown.len().saturating_sub(1)
    };
    let mut shown = columns;
    let mut drops = DROP_ORDER.iter();
    loop {
        let mut widths: [Option<usize>; COLUMNS.len()] =
            std::array::from_fn(|index| shown[index].then_some(natural[index]));
        for index in SHRINK_ORDER {
            let excess = total(&widths).saturating_sub(width);
            if let Some(current) = widths[index] {
                let floor = MIN_NAME_WIDTH.min(current);
                widths[index] = Some(current - excess.min(current - floor));
            }
        }
        if total(&widths) <= width {
            return widths;
        }
        match drops.next() {
            Some(&index) => shown[index] = false,
            None => return widths,
        }
    }
}
