//! The `concurrency` settings a sweep runs: fixed numbers and `"adaptive"`.

use std::fmt;
use std::str::FromStr;

/// One item of `--concurrency`, as typed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConcurrencyArg {
    /// `concurrency = N`.
    Fixed(usize),
    /// `concurrency = "adaptive"`; its ceiling is settled once the whole list is known.
    Adaptive,
}

impl FromStr for ConcurrencyArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("adaptive") {
            return Ok(Self::Adaptive);
        }
        match s.parse::<usize>() {
            Ok(n) if n > 0 => Ok(Self::Fixed(n)),
            _ => Err(format!("{s:?}: a positive number or \"adaptive\"")),
        }
    }
}

/// A ferry `[delivery]` concurrency setting, ready to be written into its config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    /// A fixed number of requests in flight.
    Fixed(usize),
    /// The adaptive limiter, allowed up to `max` requests in flight.
    Adaptive {
        /// `max_concurrency`.
        max: usize,
    },
}

/// The adaptive ceiling when the list has no fixed number to borrow it from.
const DEFAULT_ADAPTIVE_MAX: usize = 256;

/// Resolves `--concurrency`: "adaptive" may go as high as the largest fixed number of the
/// list, so that it competes with the same connection budget as the best fixed row.
pub fn settings(list: &[ConcurrencyArg]) -> Vec<Setting> {
    let max = list
        .iter()
        .filter_map(|c| match c {
            ConcurrencyArg::Fixed(n) => Some(*n),
            ConcurrencyArg::Adaptive => None,
        })
        .max()
        .unwrap_or(DEFAULT_ADAPTIVE_MAX);
    list.iter()
        .map(|c| match c {
            ConcurrencyArg::Fixed(n) => Setting::Fixed(*n),
            ConcurrencyArg::Adaptive => Setting::Adaptive { max },
        })
        .collect()
}

impl Setting {
    /// Requests that may be in flight at once: the fixed number, or adaptive's ceiling.
    /// The HTTP pool, the sink ceiling's load generator and the paced rate use it.
    pub fn slots(self) -> usize {
        match self {
            Self::Fixed(n) | Self::Adaptive { max: n } => n,
        }
    }

    /// The body of ferry's `[routes.bench.delivery]` section.
    pub fn delivery_toml(self) -> String {
        match self {
            Self::Fixed(n) => format!("concurrency = {n}\n"),
            Self::Adaptive { max } => {
                format!("concurrency = \"adaptive\"\nmax_concurrency = {max}\n")
            }
        }
    }
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(n) => write!(f, "{n}"),
            Self::Adaptive { .. } => f.write_str("adaptive"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_takes_the_largest_fixed_number() {
        let list: Vec<ConcurrencyArg> = ["16", "64", "adaptive"]
            .iter()
            .map(|s| s.parse().expect("a valid setting"))
            .collect();
        assert_eq!(
            settings(&list),
            vec![
                Setting::Fixed(16),
                Setting::Fixed(64),
                Setting::Adaptive { max: 64 }
            ]
        );
    }

    #[test]
    fn adaptive_alone_gets_the_default_ceiling() {
        assert_eq!(
            settings(&[ConcurrencyArg::Adaptive]),
            vec![Setting::Adaptive { max: 256 }]
        );
        assert!("0".parse::<ConcurrencyArg>().is_err());
        assert!("fast".parse::<ConcurrencyArg>().is_err());
    }
}
