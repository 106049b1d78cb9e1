//! Zones and lines of one camera, in frame pixels, and what tracks do with them.
//!
//! * A track's reference point is the bottom centre of its (filtered) box: where a person
//!   stands. Only tracks matched in the frame move their point; a lost track stays where it
//!   was last seen.
//! * **Zones**: a track is in a zone while its point is inside the polygon (even-odd rule);
//!   entering and leaving are events. A track that ends while inside leaves.
//! * **Lines**: a directed segment `from -> to`. The side of a point is the sign of the cross
//!   product `(to - from) x (p - from)`. A crossing is counted when a track's *committed* side
//!   flips, and the path between the last committed point and the new one cuts the segment
//!   within its extent: `in` from negative to positive, `out` from positive to negative.
//! * **Hysteresis**: a side is only committed when the point is at least `hysteresis_px` away
//!   from the line. A point inside that band commits nothing, so jitter around the line, or an
//!   object standing on it, counts nothing; it must get clear of the band on the other side to
//!   count once. A track first seen inside the band has no side until it leaves the band.

use std::collections::HashMap;

/// `[[zones]]` of the agent's configuration.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneConfig {
    pub name: String,
    /// At least three `[x, y]` corners, in frame pixels.
    pub polygon: Vec<[f32; 2]>,
    /// Labels the zone counts (all when empty).
    #[serde(default)]
    pub classes: Vec<String>,
}

/// `[[lines]]` of the agent's configuration.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineConfig {
    pub name: String,
    pub from: [f32; 2],
    pub to: [f32; 2],
    /// Labels the line counts (all when empty).
    #[serde(default)]
    pub classes: Vec<String>,
    /// Half-width of the band around the line that commits no side (see the module doc).
    #[serde(default = "default_hysteresis")]
    pub hysteresis_px: f32,
}

fn default_hysteresis() -> f32 {
    6.0
}

/// A zone or line setting that cannot be used: the key and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("key `{key}`: {why}")]
pub struct SceneError {
    pub key: String,
    pub why: String,
}

fn refuse(key: String, why: impl Into<String>) -> SceneError {
    SceneError {
        key,
        why: why.into(),
    }
}

/// Which way a line was crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// From the negative side to the positive side.
    In,
    Out,
}

/// What a track did in the scene.
#[derive(Debug, Clone, PartialEq)]
pub enum SceneEvent {
    ZoneEntered {
        zone: String,
        track_id: u64,
    },
    ZoneLeft {
        zone: String,
        track_id: u64,
    },
    LineCrossed {
        line: String,
        track_id: u64,
        direction: Direction,
    },
}

#[derive(Debug, Clone)]
struct Zone {
    name: String,
    polygon: Vec<[f32; 2]>,
    /// Class ids counted; `None`: all.
    classes: Option<Vec<u32>>,
}

#[derive(Debug, Clone)]
struct Line {
    name: String,
    from: [f32; 2],
    to: [f32; 2],
    classes: Option<Vec<u32>>,
    band: f32,
}

/// The side of a line a track committed to, and the point where it last did.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Side {
    Unknown,
    Negative([f32; 2]),
    Positive([f32; 2]),
}

#[derive(Debug, Clone)]
struct Place {
    inside: Vec<bool>,
    sides: Vec<Side>,
}

/// The zones and lines of one camera, and where each track is in them.
#[derive(Debug, Clone, Default)]
pub struct Scene {
    zones: Vec<Zone>,
    lines: Vec<Line>,
    places: HashMap<u64, Place>,
}

/// Class names to ids (`labels[id]`), refusing names the model does not know.
fn class_ids(
    key: &str,
    names: &[String],
    labels: &[String],
) -> Result<Option<Vec<u32>>, SceneError> {
    if names.is_empty() {
        return Ok(None);
    }
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            labels
                .iter()
                .position(|l| l == n)
                .and_then(|p| u32::try_from(p).ok())
                .ok_or_else(|| {
                    refuse(
                        format!("{key}.classes[{i}]"),
                        format!(
                            "unknown class `{n}` (the model's classes: {})",
                            labels.join(", ")
                        ),
                    )
                })
        })
        .collect::<Result<Vec<u32>, _>>()
        .map(Some)
}

/// A zone's or line's name: not empty, and no other zone or line has it (`names`: the names
/// so far, with the key that has each).
fn unique_name<'a>(
    names: &mut HashMap<&'a str, String>,
    key: &str,
    name: &'a str,
) -> Result<(), SceneError> {
    if name.is_empty() {
        return Err(refuse(format!("{key}.name"), "must not be empty"));
    }
    if let Some(first) = names.insert(name, key.to_string()) {
        return Err(refuse(
            format!("{key}.name"),
            format!("`{name}` is also the name of {first}"),
        ));
    }
    Ok(())
}

fn within(key: String, p: [f32; 2], frame: Option<(u32, u32)>) -> Result<(), SceneError> {
    if !p[0].is_finite() || !p[1].is_finite() {
        return Err(refuse(key, "coordinates must be finite numbers"));
    }
    if let Some((w, h)) = frame {
        let (w, h) = (w as f32, h as f32);
        if p[0] < 0.0 || p[1] < 0.0 || p[0] > w || p[1] > h {
            return Err(refuse(
                key,
                format!("[{}, {}] is outside the {w}x{h} frame", p[0], p[1]),
            ));
        }
    }
    Ok(())
}

impl Scene {
    /// Checks the settings against the frame size (when known) and the model's labels.
    pub fn new(
        zones: &[ZoneConfig],
        lines: &[LineConfig],
        frame: Option<(u32, u32)>,
        labels: &[String],
    ) -> Result<Self, SceneError> {
        let mut names: HashMap<&str, String> = HashMap::new();
        let mut scene = Scene::default();
        for (i, z) in zones.iter().enumerate() {
            let key = format!("zones[{i}]");
            unique_name(&mut names, &key, &z.name)?;
            if z.polygon.len() < 3 {
                return Err(refuse(
                    format!("{key}.polygon"),
                    format!("needs at least 3 points, has {}", z.polygon.len()),
                ));
            }
            for (k, p) in z.polygon.iter().enumerate() {
                within(format!("{key}.polygon[{k}]"), *p, frame)?;
            }
            if area(&z.polygon).abs() < 1.0 {
                return Err(refuse(format!("{key}.polygon"), "encloses no area"));
            }
            scene.zones.push(Zone {
                name: z.name.clone(),
                polygon: z.polygon.clone(),
                classes: class_ids(&key, &z.classes, labels)?,
            });
        }
        for (i, l) in lines.iter().enumerate() {
            let key = format!("lines[{i}]");
            unique_name(&mut names, &key, &l.name)?;
            within(format!("{key}.from"), l.from, frame)?;
            within(format!("{key}.to"), l.to, frame)?;
            if (l.to[0] - l.from[0]).hypot(l.to[1] - l.from[1]) < 1.0 {
                return Err(refuse(
                    key,
                    "from and to are the same point (a line needs a length)",
                ));
            }
            if !(l.hysteresis_px.is_finite() && l.hysteresis_px >= 0.0) {
                return Err(refuse(
                    format!("{key}.hysteresis_px"),
                    "must be a number >= 0",
                ));
            }
            scene.lines.push(Line {
                name: l.name.clone(),
                from: l.from,
                to: l.to,
                classes: class_ids(&key, &l.classes, labels)?,
                band: l.hysteresis_px,
            });
        }
        Ok(scene)
    }

    /// Whether there is anything to watch.
    pub fn is_empty(&self) -> bool {
        self.zones.is_empty() && self.lines.is_empty()
    }

    /// Moves `track_id`'s point to the bottom centre of `bbox`; returns what that changed.
    pub fn observe(&mut self, track_id: u64, class_id: u32, bbox: [f32; 4]) -> Vec<SceneEvent> {
        let p = [(bbox[0] + bbox[2]) / 2.0, bbox[3]];
        let (zn, ln) = (self.zones.len(), self.lines.len());
        let place = self.places.entry(track_id).or_insert_with(|| Place {
            inside: vec![false; zn],
            sides: vec![Side::Unknown; ln],
        });
        let counts =
            |classes: &Option<Vec<u32>>| classes.as_ref().is_none_or(|c| c.contains(&class_id));
        let mut out = Vec::new();
        for (z, was) in self.zones.iter().zip(place.inside.iter_mut()) {
            if !counts(&z.classes) {
                continue;
            }
            let now = contains(&z.polygon, p);
            if now != *was {
                *was = now;
                let zone = z.name.clone();
                out.push(if now {
                    SceneEvent::ZoneEntered { zone, track_id }
                } else {
                    SceneEvent::ZoneLeft { zone, track_id }
                });
            }
        }
        for (l, side) in self.lines.iter().zip(place.sides.iter_mut()) {
            if !counts(&l.classes) {
                continue;
            }
            let d = signed_distance(l.from, l.to, p);
            if d.abs() < l.band {
                continue; // inside the band: nothing committed
            }
            let new = if d > 0.0 {
                Side::Positive(p)
            } else {
                Side::Negative(p)
            };
            let crossed = match (*side, new) {
                (Side::Negative(a), Side::Positive(_)) if cuts_within(l.from, l.to, a, p) => {
                    Some(Direction::In)
                }
                (Side::Positive(a), Side::Negative(_)) if cuts_within(l.from, l.to, a, p) => {
                    Some(Direction::Out)
                }
                _ => None,
            };
            *side = new;
            if let Some(direction) = crossed {
                out.push(SceneEvent::LineCrossed {
                    line: l.name.clone(),
                    track_id,
                    direction,
                });
            }
        }
        out
    }

    /// Forgets an ended track: it leaves the zones it was in.
    pub fn forget(&mut self, track_id: u64) -> Vec<SceneEvent> {
        let Some(place) = self.places.remove(&track_id) else {
            return Vec::new();
        };
        self.zones
            .iter()
            .zip(place.inside)
            .filter(|(_, inside)| *inside)
            .map(|(z, _)| SceneEvent::ZoneLeft {
                zone: z.name.clone(),
                track_id,
            })
            .collect()
    }
}

/// Twice the signed area (shoelace); its sign is the winding.
fn area(poly: &[[f32; 2]]) -> f32 {
    let n = poly.len();
    (0..n)
        .map(|i| {
            let (a, b) = (poly[i], poly[(i + 1) % n]);
            a[0] * b[1] - b[0] * a[1]
        })
        .sum()
}

/// Even-odd rule: a ray to the right crosses the border an odd number of times.
pub fn contains(poly: &[[f32; 2]], p: [f32; 2]) -> bool {
    let mut inside = false;
    let n = poly.len();
    let mut j = n - 1;
    for i in 0..n {
        let (a, b) = (poly[i], poly[j]);
        if (a[1] > p[1]) != (b[1] > p[1]) {
            let x = a[0] + (p[1] - a[1]) * (b[0] - a[0]) / (b[1] - a[1]);
            if p[0] < x {
                inside = !inside;
            }
        }
        j = i;
    }
    inside
}

/// Distance of `p` from the line through `from -> to`, positive on the side the cross
/// product `(to - from) x (p - from)` is positive.
fn signed_distance(from: [f32; 2], to: [f32; 2], p: [f32; 2]) -> f32 {
    let (dx, dy) = (to[0] - from[0], to[1] - from[1]);
    let cross = dx * (p[1] - from[1]) - dy * (p[0] - from[0]);
    cross / dx.hypot(dy)
}

/// Whether the path `a -> b` (on opposite sides) cuts the line within the segment's extent.
fn cuts_within(from: [f32; 2], to: [f32; 2], a: [f32; 2], b: [f32; 2]) -> bool {
    let (da, db) = (signed_distance(from, to, a), signed_distance(from, to, b));
    if da == db {
        return false;
    }
    let f = da / (da - db);
    let c = [a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f];
    let (dx, dy) = (to[0] - from[0], to[1] - from[1]);
    let t = ((c[0] - from[0]) * dx + (c[1] - from[1]) * dy) / (dx * dx + dy * dy);
    (0.0..=1.0).contains(&t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<String> {
        vec!["person".into(), "car".into()]
    }

    fn line(from: [f32; 2], to: [f32; 2]) -> LineConfig {
        LineConfig {
            name: "entrance".into(),
            from,
            to,
            classes: vec![],
            hysteresis_px: 6.0,
        }
    }

    /// A box whose bottom centre is `p`.
    fn at(p: [f32; 2]) -> [f32; 4] {
        [p[0] - 10.0, p[1] - 40.0, p[0] + 10.0, p[1]]
    }

    #[test]
    fn the_even_odd_rule_decides_inside() {
        let square = [[0.0, 0.0], [10.0, 0.0], [10.0, 10.0], [0.0, 10.0]];
        assert!(contains(&square, [5.0, 5.0]));
        assert!(!contains(&square, [15.0, 5.0]));
        // A bow tie: the crossing region counts by the even-odd rule.
        let bow = [[0.0, 0.0], [10.0, 10.0], [10.0, 0.0], [0.0, 10.0]];
        assert!(contains(&bow, [2.0, 5.0]));
        assert!(!contains(&bow, [5.0, 1.0]));
    }

    /// Walking down across a horizontal line drawn left to right is `in` (the cross product
    /// goes from negative to positive in image coordinates, y down); walking back is `out`.
    #[test]
    fn crossings_have_a_direction_and_jitter_counts_nothing() {
        let mut s = Scene::new(
            &[],
            &[line([0.0, 500.0], [1280.0, 500.0])],
            Some((1280, 720)),
            &labels(),
        )
        .unwrap();
        let mut events = Vec::new();
        for y in [
            480.0, 490.0, 499.0, 503.0, 497.0, 502.0, 498.0, 504.0, 520.0, 530.0,
        ] {
            events.extend(s.observe(1, 0, at([640.0, y])));
        }
        assert_eq!(
            events,
            vec![SceneEvent::LineCrossed {
                line: "entrance".into(),
                track_id: 1,
                direction: Direction::In
            }],
            "jitter inside the band counts nothing; one crossing"
        );
        let back: Vec<_> = [510.0, 495.0, 470.0]
            .into_iter()
            .flat_map(|y| s.observe(1, 0, at([640.0, y])))
            .collect();
        assert_eq!(
            back,
            vec![SceneEvent::LineCrossed {
                line: "entrance".into(),
                track_id: 1,
                direction: Direction::Out
            }]
        );
    }

    #[test]
    fn a_crossing_outside_the_segment_does_not_count() {
        let mut s = Scene::new(
            &[],
            &[line([100.0, 500.0], [400.0, 500.0])],
            None,
            &labels(),
        )
        .unwrap();
        let events: Vec<_> = [480.0, 520.0]
            .into_iter()
            .flat_map(|y| s.observe(7, 0, at([900.0, y])))
            .collect();
        assert!(events.is_empty(), "{events:?}");
    }

    #[test]
    fn zones_are_entered_and_left_and_class_filters_apply() {
        let zone = ZoneConfig {
            name: "door".into(),
            polygon: vec![
                [100.0, 400.0],
                [400.0, 400.0],
                [400.0, 720.0],
                [100.0, 720.0],
            ],
            classes: vec!["person".into()],
        };
        let mut s = Scene::new(&[zone], &[], Some((1280, 720)), &labels()).unwrap();
        assert!(s.observe(1, 0, at([50.0, 500.0])).is_empty());
        assert_eq!(
            s.observe(1, 0, at([200.0, 500.0])),
            vec![SceneEvent::ZoneEntered {
                zone: "door".into(),
                track_id: 1
            }]
        );
        assert!(
            s.observe(2, 1, at([200.0, 500.0])).is_empty(),
            "a car is not counted"
        );
        assert_eq!(
            s.forget(1),
            vec![SceneEvent::ZoneLeft {
                zone: "door".into(),
                track_id: 1
            }]
        );
    }

    #[test]
    fn bad_settings_are_refused_naming_the_key() {
        let frame = Some((1280, 720));
        let tri = |name: &str| ZoneConfig {
            name: name.into(),
            polygon: vec![[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]],
            classes: vec![],
        };
        let key = |z: &[ZoneConfig], l: &[LineConfig]| {
            Scene::new(z, l, frame, &labels()).unwrap_err().key
        };
        let mut two = tri("a");
        two.polygon.pop();
        assert_eq!(key(&[two], &[]), "zones[0].polygon");
        assert_eq!(key(&[tri("a"), tri("a")], &[]), "zones[1].name");
        assert_eq!(
            key(
                &[tri("a")],
                &[LineConfig {
                    name: "a".into(),
                    ..line([0.0, 0.0], [5.0, 5.0])
                }]
            ),
            "lines[0].name"
        );
        assert_eq!(key(&[], &[line([3.0, 3.0], [3.0, 3.0])]), "lines[0]");
        assert_eq!(key(&[], &[line([0.0, 0.0], [2000.0, 5.0])]), "lines[0].to");
        let mut cat = tri("a");
        cat.classes = vec!["person".into(), "cat".into()];
        let e = Scene::new(&[cat], &[], frame, &labels()).unwrap_err();
        assert_eq!(e.key, "zones[0].classes[1]");
        assert!(e.to_string().contains("unknown class `cat`"), "{e}");
    }
}
