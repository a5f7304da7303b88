//! The loss curve `loss.png` (drawn directly into pixels, no plotting crate).

use std::path::Path;

use anyhow::Result;

use crate::io::images::save_png;

/// Layout of `loss.png`: the plot area is `LEFT..WIDTH - RIGHT` by `TOP..HEIGHT - BOTTOM`; the
/// margins hold the tick labels and the axis titles (text is drawn at `TEXT_SCALE` × the 5×7
/// font, i.e. 14 px tall).
const WIDTH: u32 = 800;
const HEIGHT: u32 = 400;
const LEFT: u32 = 100;
const RIGHT: u32 = 30;
const TOP: u32 = 20;
const BOTTOM: u32 = 56;
const TEXT_SCALE: u32 = 2;
const TICK: u32 = 5;
const INK: image::Rgb<u8> = image::Rgb([0, 0, 0]);
const TEXT: image::Rgb<u8> = image::Rgb([40, 40, 40]);
const GRID: image::Rgb<u8> = image::Rgb([232, 232, 232]);

/// The loss per step (light) and its moving average (dark), log-scaled y axis, with labelled
/// ticks (steps on x, loss values on y) and axis titles.
pub fn loss_plot(history: &[(u64, f32)], path: &Path) -> Result<()> {
    save_png(&render_loss_plot(history), path)
}

fn render_loss_plot(history: &[(u64, f32)]) -> image::RgbImage {
    let mut img = image::RgbImage::from_pixel(WIDTH, HEIGHT, image::Rgb([255, 255, 255]));
    let points = log_losses(history);
    if points.len() >= 2 {
        let (frame, xticks) = Frame::fit(&points);
        let yticks = frame.loss_tick_rows();
        let xticks = frame.step_tick_columns(xticks);
        // Grid lines first so that the curves and axes draw over them.
        draw_grid(&mut img, &xticks, &yticks);
        let smooth = moving_average(&points);
        for (series, color) in [(&points, [170, 190, 230]), (&smooth, [20, 60, 160])] {
            draw_series(&mut img, &frame, series, image::Rgb(color));
        }
        draw_step_ticks(&mut img, &xticks);
        draw_loss_ticks(&mut img, &yticks);
    }
    draw_axes(&mut img);
    draw_axis_titles(&mut img);
    img
}

/// (step, log10 loss) of the losses a log axis can show (finite and positive).
fn log_losses(history: &[(u64, f32)]) -> Vec<(u64, f64)> {
    history
        .iter()
        .filter(|(_, l)| l.is_finite() && *l > 0.0)
        .map(|&(s, l)| (s, (l as f64).log10()))
        .collect()
}

/// The data range shown in the plot area `LEFT..WIDTH - RIGHT` by `TOP..HEIGHT - BOTTOM`:
/// steps `s0..=s1` across, log10 losses `lo..=lo + span` up.
struct Frame {
    s0: f64,
    s1: f64,
    lo: f64,
    hi: f64,
    span: f64,
}

impl Frame {
    /// The frame around `points` (at least two) and the step ticks of its axis.
    fn fit(points: &[(u64, f64)]) -> (Frame, Vec<u64>) {
        let (first, last) = (points[0].0, points[points.len() - 1].0);
        let lo = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let hi = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        let span = (hi - lo).max(1e-6);
        // As many step ticks as fit with the widest label (the last step's) plus a gap.
        let label_w = text_width(&last.to_string(), TEXT_SCALE) + 20;
        let (x0, x1) = (LEFT, WIDTH - RIGHT);
        let (s0, xticks) = step_axis(first, last, ((x1 - x0) / label_w).clamp(2, 8) as u64);
        let frame = Frame {
            s0: s0 as f64,
            s1: last as f64,
            lo,
            hi,
            span,
        };
        (frame, xticks)
    }

    /// The pixel position (unrounded, unclipped) of (step, log10 loss).
    fn to_px(&self, s: f64, l: f64) -> (f64, f64) {
        let (x0, x1, y0, y1) = (LEFT, WIDTH - RIGHT, TOP, HEIGHT - BOTTOM);
        let x = x0 as f64 + (s - self.s0) / (self.s1 - self.s0).max(1.0) * (x1 - x0) as f64;
        let y = y1 as f64 - (l - self.lo) / self.span * (y1 - y0) as f64;
        (x, y)
    }

    /// The loss axis's tick values and the pixel rows they fall on.
    fn loss_tick_rows(&self) -> Vec<(f64, f64)> {
        let (y0, y1) = (TOP, HEIGHT - BOTTOM);
        loss_ticks(10f64.powf(self.lo), 10f64.powf(self.hi))
            .into_iter()
            .map(|v| {
                (
                    v,
                    self.to_px(self.s0, v.log10())
                        .1
                        .round()
                        .clamp(y0 as f64, y1 as f64),
                )
            })
            .collect()
    }

    /// The step ticks and the pixel columns they fall on.
    fn step_tick_columns(&self, ticks: Vec<u64>) -> Vec<(u64, f64)> {
        let (x0, x1) = (LEFT, WIDTH - RIGHT);
        ticks
            .into_iter()
            .map(|s| {
                (
                    s,
                    self.to_px(s as f64, self.lo)
                        .0
                        .round()
                        .clamp(x0 as f64, x1 as f64),
                )
            })
            .collect()
    }
}

/// Light lines across the plot area at each tick.
fn draw_grid(img: &mut image::RgbImage, xticks: &[(u64, f64)], yticks: &[(f64, f64)]) {
    let (x0, x1, y0, y1) = (LEFT, WIDTH - RIGHT, TOP, HEIGHT - BOTTOM);
    for &(_, y) in yticks {
        for x in x0..=x1 {
            img.put_pixel(x, y as u32, GRID);
        }
    }
    for &(_, x) in xticks {
        for y in y0..=y1 {
            img.put_pixel(x as u32, y, GRID);
        }
    }
}

/// The trailing mean of each point over the `len / 50` points before it (at least 1), so
/// that the trend shows through the per-step noise whatever the run's length.
fn moving_average(points: &[(u64, f64)]) -> Vec<(u64, f64)> {
    let k = (points.len() / 50).max(1);
    (0..points.len())
        .map(|i| {
            let a = i.saturating_sub(k);
            let window = &points[a..=i];
            (
                points[i].0,
                window.iter().map(|p| p.1).sum::<f64>() / window.len() as f64,
            )
        })
        .collect()
}

/// A polyline through the series, each segment sampled at least once per pixel; pixels off
/// the image are skipped.
fn draw_series(
    img: &mut image::RgbImage,
    frame: &Frame,
    series: &[(u64, f64)],
    color: image::Rgb<u8>,
) {
    for w in series.windows(2) {
        let (a, b) = (
            frame.to_px(w[0].0 as f64, w[0].1),
            frame.to_px(w[1].0 as f64, w[1].1),
        );
        let n = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as usize).max(1);
        for t in 0..=n {
            let f = t as f64 / n as f64;
            let (x, y) = (a.0 + (b.0 - a.0) * f, a.1 + (b.1 - a.1) * f);
            if x >= 0.0 && y >= 0.0 && (x as u32) < WIDTH && (y as u32) < HEIGHT {
                img.put_pixel(x as u32, y as u32, color);
            }
        }
    }
}

/// Tick marks under the x axis, each labelled with its step; a label that would touch the
/// previous one is left out (the tick stays), which only happens for very long step numbers.
fn draw_step_ticks(img: &mut image::RgbImage, xticks: &[(u64, f64)]) {
    let y1 = HEIGHT - BOTTOM;
    let mut last_right = i64::MIN;
    for &(s, x) in xticks {
        let x = x as u32;
        for y in y1..y1 + TICK {
            img.put_pixel(x, y, INK);
        }
        let label = s.to_string();
        let w = text_width(&label, TEXT_SCALE);
        let left = (x as i64 - w as i64 / 2).clamp(0, (WIDTH - w) as i64);
        if left >= last_right + 8 {
            draw_text(img, &label, left as u32, y1 + TICK + 4, TEXT_SCALE, false);
            last_right = left + w as i64;
        }
    }
}

/// Tick marks left of the y axis, each labelled with its loss; a label that would touch the
/// one above it is left out (the tick stays), which only happens for crowded decades.
fn draw_loss_ticks(img: &mut image::RgbImage, yticks: &[(f64, f64)]) {
    let x0 = LEFT;
    let text_h = 7 * TEXT_SCALE;
    let mut last_top = i64::MAX;
    for &(v, y) in yticks {
        let y = y as u32;
        for x in x0 - TICK..x0 {
            img.put_pixel(x, y, INK);
        }
        let label = fmt_tick(v);
        let w = text_width(&label, TEXT_SCALE);
        let top = (y as i64 - text_h as i64 / 2).clamp(0, (HEIGHT - text_h) as i64);
        if top + text_h as i64 + 4 <= last_top {
            let left = (x0 - TICK - 4).saturating_sub(w);
            draw_text(img, &label, left, top as u32, TEXT_SCALE, false);
            last_top = top;
        }
    }
}

/// The x and y axes along the plot area's bottom and left edges.
fn draw_axes(img: &mut image::RgbImage) {
    let (x0, x1, y0, y1) = (LEFT, WIDTH - RIGHT, TOP, HEIGHT - BOTTOM);
    for x in x0..=x1 {
        img.put_pixel(x, y1, INK);
    }
    for y in y0..=y1 {
        img.put_pixel(x0, y, INK);
    }
}

/// Axis titles: "step" centred under the step labels, "loss (log)" rotated along the left
/// edge, centred on the plot area.
fn draw_axis_titles(img: &mut image::RgbImage) {
    let (x0, x1, y0, y1) = (LEFT, WIDTH - RIGHT, TOP, HEIGHT - BOTTOM);
    let title = "step";
    let w = text_width(title, TEXT_SCALE);
    let top = y1 + TICK + 4 + 7 * TEXT_SCALE + 8;
    draw_text(img, title, (x0 + x1 - w) / 2, top, TEXT_SCALE, false);
    let title = "loss (log)";
    let w = text_width(title, TEXT_SCALE);
    draw_text(img, title, 8, (y0 + y1 + w) / 2, TEXT_SCALE, true);
}

/// The step axis: its left edge and the ticks on it, multiples of a 1-2-5 step giving at most
/// `max_intervals` intervals over `first..=last`. The left edge snaps down to the tick below
/// `first` when that is within 5% of the range, so that a run logged from step 1 gets its 0 at
/// the origin without shifting the curve visibly.
fn step_axis(first: u64, last: u64, max_intervals: u64) -> (u64, Vec<u64>) {
    let range = last.saturating_sub(first);
    let step = nice_step((range as f64 / max_intervals.max(1) as f64).max(1.0)) as u64;
    let below = first / step * step;
    let start = if (first - below) as f64 <= 0.05 * range as f64 {
        below
    } else {
        first
    };
    let ticks = (start.div_ceil(step)..=last / step)
        .map(|i| i * step)
        .collect();
    (start, ticks)
}

/// The smallest 1, 2 or 5 × 10^k that is at least `raw` (> 0).
fn nice_step(raw: f64) -> f64 {
    let mut e = raw.log10().floor();
    loop {
        for m in [1.0, 2.0, 5.0] {
            let v = m * 10f64.powf(e);
            if v >= raw * (1.0 - 1e-9) {
                return v;
            }
        }
        e += 1.0;
    }
}

/// Tick values for a log axis covering the losses `lo..=hi` (> 0): decades (every n-th when
/// there are more than 10); over less than 2 decades also 2 and 5 × 10^k; if that still gives
/// fewer than 2 ticks, every integer mantissa; failing that (a range narrower than one of
/// those steps), linear 1-2-5 ticks, so a flat curve still gets two numbers to read against.
fn loss_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let inside = |v: f64| v >= lo * (1.0 - 1e-9) && v <= hi * (1.0 + 1e-9);
    let (d0, d1) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    let with = |mantissas: &[f64], stride: i32| -> Vec<f64> {
        (d0..=d1)
            .filter(|d| d.rem_euclid(stride) == 0)
            .flat_map(|d| mantissas.iter().map(move |m| m * 10f64.powi(d)))
            .filter(|&v| inside(v))
            .collect()
    };
    let decades = hi.log10() - lo.log10();
    if decades >= 2.0 {
        return with(&[1.0], ((decades / 10.0).ceil() as i32).max(1));
    }
    let ticks = with(&[1.0, 2.0, 5.0], 1);
    if ticks.len() >= 2 {
        return ticks;
    }
    let ticks = with(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0], 1);
    if ticks.len() >= 2 {
        return ticks;
    }
    if hi - lo <= hi * 1e-6 {
        return ticks; // a flat curve: its own value if that is a tick, else nothing
    }
    let step = nice_step((hi - lo) / 5.0);
    ((lo / step - 1e-9).ceil() as i64..=(hi / step + 1e-9).floor() as i64)
        .map(|i| i as f64 * step)
        .filter(|&v| v > 0.0 && inside(v))
        .collect()
}

/// A tick value in few characters: plain decimals from 0.01 to 99999 ("0.05", "0.2", "1",
/// "2000"), `me-k` outside that ("1e-3", "2.5e-4", "1e5"). Rounded to 10 significant digits
/// first so that `3 * 0.1` prints as "0.3".
fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let s = format!("{v:.9e}");
    let (mant, exp) = s.split_once('e').expect("`{:e}` output has an exponent");
    let exp: i32 = exp.parse().expect("`{:e}` exponent is an integer");
    let mant = mant.trim_end_matches('0').trim_end_matches('.');
    if !(-2..5).contains(&exp) {
        return format!("{mant}e{exp}");
    }
    let frac_digits = mant.split_once('.').map_or(0, |(_, f)| f.len()) as i32;
    let decimals = (frac_digits - exp).max(0) as usize;
    let clean: f64 = s.parse().expect("`{:e}` output parses");
    format!("{clean:.decimals$}")
}

/// 5×7 pixel glyphs ('#' = ink) for the characters the plot labels use; narrow characters
/// are narrower so that "0.05" does not look spaced out. Unknown characters draw as a space.
const GLYPHS: &[(char, [&str; 7])] = &[
    (
        '0',
        [
            ".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###.",
        ],
    ),
    (
        '1',
        [
            "..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###.",
        ],
    ),
    (
        '2',
        [
            ".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####",
        ],
    ),
    (
        '3',
        [
            "#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###.",
        ],
    ),
    (
        '4',
        [
            "...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#.",
        ],
    ),
    (
        '5',
        [
            "#####", "#....", "####.", "....#", "....#", "#...#", ".###.",
        ],
    ),
    (
        '6',
        [
            "..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###.",
        ],
    ),
    (
        '7',
        [
            "#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#...",
        ],
    ),
    (
        '8',
        [
            ".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###.",
        ],
    ),
    (
        '9',
        [
            ".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##..",
        ],
    ),
    ('.', ["..", "..", "..", "..", "..", "##", "##"]),
    (
        '-',
        ["....", "....", "....", "####", "....", "....", "...."],
    ),
    (
        '+',
        [
            ".....", "..#..", "..#..", "#####", "..#..", "..#..", ".....",
        ],
    ),
    (
        'e',
        [
            ".....", ".....", ".###.", "#...#", "#####", "#....", ".###.",
        ],
    ),
    (
        'g',
        [
            ".....", ".....", ".####", "#...#", ".####", "....#", ".###.",
        ],
    ),
    ('l', ["##.", ".#.", ".#.", ".#.", ".#.", ".#.", "###"]),
    (
        'o',
        [
            ".....", ".....", ".###.", "#...#", "#...#", "#...#", ".###.",
        ],
    ),
    (
        'p',
        [
            ".....", ".....", "####.", "#...#", "####.", "#....", "#....",
        ],
    ),
    (
        's',
        [
            ".....", ".....", ".####", "#....", ".###.", "....#", "####.",
        ],
    ),
    (
        't',
        [
            ".#...", ".#...", "###..", ".#...", ".#...", ".#..#", "..##.",
        ],
    ),
    ('(', ["..#", ".#.", "#..", "#..", "#..", ".#.", "..#"]),
    (')', ["#..", ".#.", "..#", "..#", "..#", ".#.", "#.."]),
    (' ', ["...", "...", "...", "...", "...", "...", "..."]),
];

fn glyph(c: char) -> [&'static str; 7] {
    GLYPHS
        .iter()
        .find(|g| g.0 == c)
        .map_or(GLYPHS[GLYPHS.len() - 1].1, |g| g.1)
}

/// Width in pixels of `text` at `scale`: glyph widths plus one column between glyphs.
fn text_width(text: &str, scale: u32) -> u32 {
    let cols: usize = text.chars().map(|c| glyph(c)[0].len() + 1).sum();
    (cols.saturating_sub(1) as u32) * scale
}

/// Draws `text` with its top-left corner at (x, y); `rotated` turns it 90° counter-clockwise
/// (reading upwards), (x, y) then being the bottom-left corner. Pixels outside are clipped.
fn draw_text(img: &mut image::RgbImage, text: &str, x: u32, y: u32, scale: u32, rotated: bool) {
    let mut advance = 0;
    for c in text.chars() {
        let rows = glyph(c);
        for (r, row) in rows.iter().enumerate() {
            for (col, _) in row.bytes().enumerate().filter(|&(_, b)| b == b'#') {
                let (u, v) = ((advance + col as u32) * scale, r as u32 * scale);
                for dy in 0..scale {
                    for dx in 0..scale {
                        let (px, py) = if rotated {
                            (x as i64 + (v + dy) as i64, y as i64 - (u + dx) as i64 - 1)
                        } else {
                            ((x + u + dx) as i64, (y + v + dy) as i64)
                        };
                        if px >= 0 && py >= 0 && px < img.width() as i64 && py < img.height() as i64
                        {
                            img.put_pixel(px as u32, py as u32, TEXT);
                        }
                    }
                }
            }
        }
        advance += rows[0].len() as u32 + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(values: &[f64]) -> Vec<String> {
        values.iter().map(|&v| fmt_tick(v)).collect()
    }

    #[test]
    fn step_ticks_use_1_2_5_spacing() {
        assert_eq!(
            step_axis(1, 1000, 8),
            (0, vec![0, 200, 400, 600, 800, 1000])
        );
        assert_eq!(step_axis(1, 37, 8), (0, vec![0, 5, 10, 15, 20, 25, 30, 35]));
        // A resumed run: the origin snaps to the tick just below its first step.
        assert_eq!(
            step_axis(5001, 6000, 8),
            (5000, vec![5000, 5200, 5400, 5600, 5800, 6000])
        );
        // Too far from a tick to snap: the axis starts at the first step.
        assert_eq!(
            step_axis(199, 1000, 8),
            (199, vec![200, 400, 600, 800, 1000])
        );
        assert_eq!(step_axis(1, 5, 8), (1, vec![1, 2, 3, 4, 5]));
        assert_eq!(step_axis(7, 7, 8), (7, vec![7]));
        assert_eq!(step_axis(1, 100_000, 4).1, vec![0, 50_000, 100_000]);
    }

    #[test]
    fn loss_ticks_are_decades_or_1_2_5() {
        // Under 2 decades: 1, 2 and 5 subdivisions.
        assert_eq!(
            labels(&loss_ticks(0.03, 0.9)),
            ["0.05", "0.1", "0.2", "0.5"]
        );
        // Over 2 decades: decades only, small values in e-notation.
        assert_eq!(
            labels(&loss_ticks(1e-4, 2.0)),
            ["1e-4", "1e-3", "0.01", "0.1", "1"]
        );
        assert_eq!(labels(&loss_ticks(0.004, 0.02)), ["5e-3", "0.01", "0.02"]);
        // Narrow ranges fall back to integer mantissas, then to linear ticks.
        assert_eq!(labels(&loss_ticks(0.25, 0.45)), ["0.3", "0.4"]);
        assert_eq!(
            labels(&loss_ticks(0.52, 0.58)),
            ["0.52", "0.54", "0.56", "0.58"]
        );
        assert_eq!(
            labels(&loss_ticks(0.4501, 0.55)),
            ["0.46", "0.48", "0.5", "0.52", "0.54"]
        );
        assert_eq!(labels(&loss_ticks(0.5, 0.5)), ["0.5"]);
        assert!(loss_ticks(0.123, 0.123).is_empty());
        // Many decades: every other decade keeps the labels apart.
        assert_eq!(
            labels(&loss_ticks(1e-12, 1e3)),
            ["1e-12", "1e-10", "1e-8", "1e-6", "1e-4", "0.01", "1", "100"]
        );
    }

    #[test]
    fn tick_labels_are_compact() {
        assert_eq!(
            labels(&[0.05, 0.3, 1.0, 2.5, 20.0, 99_999.0, 1e5, 1e-3, 2.5e-4, 0.0]),
            [
                "0.05", "0.3", "1", "2.5", "20", "99999", "1e5", "1e-3", "2.5e-4", "0"
            ]
        );
        assert_eq!(fmt_tick(3.0 * 0.1), "0.3");
    }

    /// The PNG decodes at the plot's size and has dark (text) pixels under the x axis below
    /// the tick marks, left of the y axis beside the tick marks, and in the title margin.
    #[test]
    fn loss_plot_png_has_axis_labels() {
        let history: Vec<(u64, f32)> = (1..=200u64)
            .map(|s| (s, 0.8 * (-(s as f32) / 60.0).exp() + 0.03))
            .chain([(201, f32::NAN), (202, 0.0), (203, f32::INFINITY)])
            .collect();
        let dir = std::env::temp_dir().join(format!("wgpu-diffusion-plot-{}", std::process::id()));
        let path = dir.join("loss.png");
        loss_plot(&history, &path).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
        let dark = |xs: std::ops::Range<u32>, ys: std::ops::Range<u32>| {
            ys.flat_map(|y| xs.clone().map(move |x| (x, y)))
                .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&c| c < 100))
                .count()
        };
        let below_x_axis = dark(0..WIDTH, HEIGHT - BOTTOM + TICK + 1..HEIGHT - BOTTOM + 24);
        let x_title = dark(0..WIDTH, HEIGHT - BOTTOM + 24..HEIGHT);
        let left_of_y_axis = dark(30..LEFT - TICK - 1, 0..HEIGHT - BOTTOM);
        let y_title = dark(0..30, 0..HEIGHT);
        assert!(
            below_x_axis > 50,
            "x tick labels: {below_x_axis} dark pixels"
        );
        assert!(x_title > 30, "x title: {x_title} dark pixels");
        assert!(
            left_of_y_axis > 50,
            "y tick labels: {left_of_y_axis} dark pixels"
        );
        assert!(y_title > 50, "y title: {y_title} dark pixels");
        // Empty, all-invalid and flat histories still give a (titled, unlabelled) plot.
        for history in [
            vec![],
            vec![(1, f32::NAN), (2, 0.0)],
            vec![(1, 0.3), (2, 0.3)],
        ] {
            let img = render_loss_plot(&history);
            assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
        }
    }

    /// Writes a demo plot of a synthetic noisy 1000-step run to `$TMPDIR/loss_demo.png` for
    /// looking at: `cargo test --release --lib train::plot -- --ignored`.
    #[test]
    #[ignore]
    fn loss_plot_demo() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let history: Vec<(u64, f32)> = (1..=1000u64)
            .map(|s| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let noise = (seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
                let l = 0.04 + 0.76 * (-(s as f64) / 150.0).exp();
                (s, (l * (1.0 + 0.8 * noise)) as f32)
            })
            .collect();
        let path = std::env::temp_dir().join("loss_demo.png");
        loss_plot(&history, &path).unwrap();
        eprintln!("wrote {}", path.display());
    }
}
