//! Which owner and group the mount shows: the image's own ids, one fixed id for every
//! entry (`uid=N`), or ranges shifted the way a user namespace map shifts them
//! (`uidmap=INSIDE:OUTSIDE:COUNT`), for launchers that run containers in a user namespace.

use std::fmt;
use std::str::FromStr;

/// The id the kernel shows for ids that no map covers (the overflow uid and gid).
pub const OVERFLOW_ID: u32 = 65534;

/// One line of a user namespace map: ids `inside .. inside + count` in the image show as
/// `outside .. outside + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub inside: u32,
    pub outside: u32,
    pub count: u32,
}

impl IdRange {
    fn end_inside(&self) -> u64 {
        u64::from(self.inside) + u64::from(self.count)
    }

    fn map(&self, id: u32) -> Option<u32> {
        (id >= self.inside && u64::from(id) < self.end_inside())
            .then(|| self.outside + (id - self.inside))
    }
}

impl FromStr for IdRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let [inside, outside, count] = parts[..] else {
            return Err(format!("'{s}' is not INSIDE:OUTSIDE:COUNT"));
        };
        let num = |what: &str, v: &str| {
            v.parse::<u32>()
                .map_err(|_| format!("'{s}': {what} '{v}' is not a number from 0 to 4294967295"))
        };
        let r = IdRange {
            inside: num("INSIDE", inside)?,
            outside: num("OUTSIDE", outside)?,
            count: num("COUNT", count)?,
        };
        if r.count == 0 {
            return Err(format!("'{s}': COUNT must be at least 1"));
        }
        if r.end_inside() > 1 << 32 || u64::from(r.outside) + u64::from(r.count) > 1 << 32 {
            return Err(format!("'{s}': the range runs past id 4294967295"));
        }
        Ok(r)
    }
}

impl fmt::Display for IdRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.inside, self.outside, self.count)
    }
}

/// How the ids stored in the image are shown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum IdView {
    /// As stored.
    #[default]
    AsStored,
    /// Every entry shows this id.
    Fixed(u32),
    /// Shifted by the first range that holds the id; [`OVERFLOW_ID`] when none does.
    Mapped(Vec<IdRange>),
}

impl IdView {
    /// A map from ranges; ranges whose inside ids overlap would make an id ambiguous.
    pub fn mapped(ranges: Vec<IdRange>) -> Result<IdView, String> {
        let mut sorted = ranges.clone();
        sorted.sort_by_key(|r| r.inside);
        if let Some(w) = sorted
            .windows(2)
            .find(|w| w[0].end_inside() > u64::from(w[1].inside))
        {
            return Err(format!("map ranges {} and {} overlap", w[0], w[1]));
        }
        Ok(IdView::Mapped(ranges))
    }

    /// The id to show for `id` as stored in the image.
    pub fn show(&self, id: u32) -> u32 {
        match self {
            IdView::AsStored => id,
            IdView::Fixed(v) => *v,
            IdView::Mapped(ranges) => ranges.iter().find_map(|r| r.map(id)).unwrap_or(OVERFLOW_ID),
        }
    }
}

/// The owner and group views together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owners {
    pub uid: IdView,
    pub gid: IdView,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(s: &str) -> IdRange {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_refuses_ranges() {
        assert_eq!(
            range("0:1000:1"),
            IdRange {
                inside: 0,
                outside: 1000,
                count: 1
            }
        );
        assert_eq!(range("1:100000:65536").to_string(), "1:100000:65536");
        for bad in [
            "",
            "1:2",
            "1:2:3:4",
            "a:1:1",
            "0:0:0",
            "-1:0:1",
            "4294967295:0:2",
            "0:4294967295:2",
        ] {
            assert!(bad.parse::<IdRange>().is_err(), "{bad:?} should be refused");
        }
        assert!("4294967295:0:1".parse::<IdRange>().is_ok());
    }

    #[test]
    fn maps_shift_like_a_user_namespace() {
        let v = IdView::mapped(vec![range("0:1000:1"), range("1:100000:65536")]).unwrap();
        assert_eq!(v.show(0), 1000);
        assert_eq!(v.show(1), 100000);
        assert_eq!(v.show(1000), 100999);
        assert_eq!(v.show(65536), 165535);
        assert_eq!(v.show(65537), OVERFLOW_ID);
        assert_eq!(v.show(u32::MAX), OVERFLOW_ID);
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        assert!(IdView::mapped(vec![range("0:0:10"), range("9:100:5")]).is_err());
        assert!(IdView::mapped(vec![range("10:0:10"), range("0:100:10")]).is_ok());
    }

    #[test]
    fn fixed_and_stored() {
        assert_eq!(IdView::Fixed(7).show(0), 7);
        assert_eq!(IdView::Fixed(7).show(12345), 7);
        assert_eq!(IdView::AsStored.show(12345), 12345);
    }
}
