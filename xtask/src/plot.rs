//! The bench's picture: horizontal bars of throughput per contender, one panel per
//! (profile, cache state), with the raw read's throughput drawn as a line across each.
//! Plain SVG text: a dozen rectangles need no plotting library.

use crate::record::{Cache, Record};
use std::fmt::Write;

const BAR_H: f64 = 16.0;
const LABEL_W: f64 = 210.0;
const PLOT_W: f64 = 420.0;

pub(crate) fn svg(records: &[Record]) -> String {
    let mut panels: Vec<(String, Cache)> = Vec::new();
    for r in records {
        let key = (r.profile.clone(), r.cache);
        if !panels.contains(&key) {
            panels.push(key);
        }
    }
    // Scale to the contenders that move every byte; `view` and `meta` bars (which move
    // none) run off the scale and are clipped, with their value printed.
    let max_gbps = records
        .iter()
        .filter(|r| !r.contender.ends_with("-view") && !r.contender.ends_with("-meta"))
        .map(|r| r.gbps)
        .filter(|g| g.is_finite())
        .fold(0.1, f64::max)
        * 1.1;
    let mut body = String::new();
    let mut y = 10.0;
    for (profile, cache) in &panels {
        let in_panel = |r: &&Record| r.profile == *profile && r.cache == *cache;
        let rows: Vec<&Record> = records
            .iter()
            .filter(in_panel)
            .filter(|r| r.contender != "raw")
            .collect();
        let raw = records
            .iter()
            .filter(in_panel)
            .find(|r| r.contender == "raw")
            .map_or(0.0, |r| r.gbps);
        let cache = cache.name();
        let _ = writeln!(
            body,
            r#"<text x="4" y="{:.0}" font-weight="bold">{profile}, {cache} cache (GB/s; line = raw read)</text>"#,
            y + 12.0
        );
        y += 20.0;
        let top = y;
        for r in &rows {
            let g = r.gbps.min(max_gbps);
            let w = g / max_gbps * PLOT_W;
            let name = r.contender.as_str();
            let color = if name.starts_with("weightlift") {
                "#2b7bb9"
            } else if name.starts_with("raw") {
                "#999"
            } else {
                "#d9822b"
            };
            let _ = writeln!(
                body,
                r#"<text x="{:.0}" y="{:.0}" text-anchor="end">{name}</text>"#,
                LABEL_W - 6.0,
                y + BAR_H - 4.0
            );
            let _ = writeln!(
                body,
                r#"<rect x="{LABEL_W}" y="{y:.0}" width="{w:.1}" height="{:.0}" fill="{color}"/>"#,
                BAR_H - 3.0
            );
            let _ = writeln!(
                body,
                r#"<text x="{:.1}" y="{:.0}">{:.2}</text>"#,
                LABEL_W + w + 4.0,
                y + BAR_H - 4.0,
                r.gbps
            );
            y += BAR_H;
        }
        let x = LABEL_W + raw.min(max_gbps) / max_gbps * PLOT_W;
        let _ = writeln!(
            body,
            r##"<line x1="{x:.1}" y1="{top:.0}" x2="{x:.1}" y2="{y:.0}" stroke="#c00" stroke-dasharray="4 2"/>"##
        );
        y += 14.0;
    }
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{:.0}" height="{y:.0}" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="white"/>
{body}</svg>
"#,
        LABEL_W + PLOT_W + 60.0
    )
}
