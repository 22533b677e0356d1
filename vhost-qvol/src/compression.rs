//! Compression on the command line (docs/FORMAT.md §18): the setting of new writes
//! (`zstd`, `zstd:LEVEL` or `off`), the unit size fixed at create (`8K` to `64K`), and the
//! words `qvol info`, `qvol stats` and `qvol compress` describe them with. Errors are one
//! sentence each.

use qvol_core::{check_level, Compression, CompressionUsage, BLOCK_SIZE};

use crate::size::{format_size, parse_size};

/// What a setting may be, for error messages and help.
const SETTINGS: &str = "zstd, zstd:LEVEL or off";

/// Parses the compression of new writes: `zstd` (zstd's default level, 3), `zstd:LEVEL`
/// (-7 to -1 for zstd's fast levels, 1 to 22), or `off` (`None`).
pub fn parse_setting(text: &str) -> Result<Option<i8>, String> {
    let (algorithm, level) = match text.split_once(':') {
        Some((algorithm, level)) => (algorithm, Some(level)),
        None => (text, None),
    };
    match (algorithm, level) {
        ("off", None) => Ok(None),
        ("zstd", None) => Ok(Some(Compression::DEFAULT_LEVEL)),
        ("zstd", Some(level)) => parse_level(level).map(Some),
        ("off", Some(_)) => Err(format!(
            "{text:?} is not a compression setting: off takes no level"
        )),
        _ => Err(format!("unknown compression {text:?}: give {SETTINGS}")),
    }
}

/// A zstd level, as `qvol_core::check_level` takes it.
fn parse_level(text: &str) -> Result<i8, String> {
    let wide: i64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a zstd level: give a whole number, as in zstd:3"))?;
    // The engine's sentence says which levels there are; a number too wide for it gets
    // the same sentence (the unit tests keep the two in step).
    let level = i8::try_from(wide).map_err(|_| level_sentence(wide))?;
    check_level(level).map_err(|e| e.to_string())?;
    Ok(level)
}

fn level_sentence(level: i64) -> String {
    format!("zstd levels are -7 to -1 and 1 to 22, not {level}")
}

/// Parses a compression unit size (`8K`, `16K`, `32K` or `64K`, or those in bytes) into the
/// `log2` of its blocks ([`Compression::unit_log2`]).
pub fn parse_unit(text: &str) -> Result<u8, String> {
    let bytes = parse_size(text)?;
    let blocks = bytes / BLOCK_SIZE;
    match blocks {
        2 | 4 | 8 | 16 if bytes % BLOCK_SIZE == 0 => Ok(blocks.trailing_zeros() as u8),
        _ => Err(format!(
            "a compression unit is 8K, 16K, 32K or 64K, not {text:?}"
        )),
    }
}

/// The setting of new writes: `zstd level 3` or `off`.
pub fn describe_level(level: Option<i8>) -> String {
    match level {
        Some(level) => format!("zstd level {level}"),
        None => "off".to_string(),
    }
}

/// A volume's compression: `zstd level 3, 16 KiB units`, `off (16 KiB units)`, or `none
/// (created without compression)` when `unit_bytes` is 0.
pub fn describe(unit_bytes: u32, level: Option<i8>) -> String {
    let unit = format_size(u64::from(unit_bytes));
    match (unit_bytes, level) {
        (0, _) => "none (created without compression)".to_string(),
        (_, Some(level)) => format!("zstd level {level}, {unit} units"),
        (_, None) => format!("off ({unit} units)"),
    }
}

/// What compression achieves on the data stored: `ratio 2.41 (8 MiB of data in 3.3 MiB)`,
/// or `no data stored yet`.
pub fn describe_usage(usage: &CompressionUsage) -> String {
    let logical = (usage.unit_lbns + usage.plain_blocks) * BLOCK_SIZE;
    let physical = (usage.unit_blocks + usage.plain_blocks) * BLOCK_SIZE;
    if physical == 0 {
        return "no data stored yet".to_string();
    }
    format!(
        "ratio {:.2} ({} of data in {})",
        usage.ratio(),
        format_size(logical),
        format_size(physical)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_zstd_with_an_optional_level_or_off() {
        assert_eq!(parse_setting("off"), Ok(None));
        assert_eq!(parse_setting("zstd"), Ok(Some(3)));
        assert_eq!(parse_setting("zstd:1"), Ok(Some(1)));
        assert_eq!(parse_setting("zstd:19"), Ok(Some(19)));
        assert_eq!(parse_setting("zstd:22"), Ok(Some(22)));
        assert_eq!(parse_setting("zstd:-7"), Ok(Some(-7)));
        assert_eq!(parse_setting("zstd:+5"), Ok(Some(5)));
    }

    /// Each refusal is one sentence naming what was wrong.
    #[test]
    fn bad_settings_are_one_sentence() {
        for (bad, needle) in [
            (
                "lz4",
                "unknown compression \"lz4\": give zstd, zstd:LEVEL or off",
            ),
            ("lz4:3", "unknown compression \"lz4:3\""),
            ("", "unknown compression \"\""),
            ("ZSTD", "unknown compression"),
            ("zstd:", "\"\" is not a zstd level"),
            ("zstd:abc", "\"abc\" is not a zstd level"),
            ("zstd:3.5", "\"3.5\" is not a zstd level"),
            ("zstd:99", "zstd levels are -7 to -1 and 1 to 22, not 99"),
            ("zstd:0", "zstd levels are -7 to -1 and 1 to 22, not 0"),
            ("zstd:-8", "not -8"),
            ("zstd:23", "not 23"),
            (
                "zstd:1000",
                "zstd levels are -7 to -1 and 1 to 22, not 1000",
            ),
            ("zstd:-99999999999", "not -99999999999"),
            ("off:3", "off takes no level"),
        ] {
            let e = parse_setting(bad).expect_err(bad);
            assert!(e.contains(needle), "{bad:?}: {e:?} lacks {needle:?}");
            assert!(!e.contains('\n') && !e.ends_with('.'), "{bad:?}: {e:?}");
        }
    }

    /// The sentence for a number too wide for an `i8` is the engine's own.
    #[test]
    fn wide_levels_get_the_engines_sentence() {
        for level in [i8::MIN, -8, 0, 23, i8::MAX] {
            let engine = check_level(level).expect_err("out of range").to_string();
            assert_eq!(engine, level_sentence(i64::from(level)));
        }
    }

    #[test]
    fn units_are_8_to_64_kib() {
        assert_eq!(parse_unit("8K"), Ok(1));
        assert_eq!(parse_unit("16K"), Ok(Compression::DEFAULT_UNIT_LOG2));
        assert_eq!(parse_unit("32k"), Ok(3));
        assert_eq!(parse_unit("64KiB"), Ok(4));
        assert_eq!(parse_unit("65536"), Ok(4));
        for bad in ["4K", "12K", "128K", "1M", "0", "16K5", "", "big"] {
            assert!(parse_unit(bad).is_err(), "{bad:?}");
        }
        for log2 in 1..=4u8 {
            let c = Compression {
                unit_log2: log2,
                level: None,
            };
            assert!(c.check().is_ok());
        }
    }

    #[test]
    fn descriptions() {
        assert_eq!(describe(16 << 10, Some(3)), "zstd level 3, 16 KiB units");
        assert_eq!(describe(64 << 10, None), "off (64 KiB units)");
        assert_eq!(describe(0, None), "none (created without compression)");
        assert_eq!(describe_level(Some(-1)), "zstd level -1");
        assert_eq!(describe_level(None), "off");
        let usage = CompressionUsage {
            unit_lbns: 2048,
            unit_blocks: 512,
            plain_blocks: 0,
        };
        assert_eq!(
            describe_usage(&usage),
            "ratio 4.00 (8 MiB of data in 2 MiB)"
        );
        let mixed = CompressionUsage {
            unit_lbns: 4,
            unit_blocks: 1,
            plain_blocks: 2,
        };
        assert_eq!(
            describe_usage(&mixed),
            "ratio 2.00 (24 KiB of data in 12 KiB)"
        );
        assert_eq!(
            describe_usage(&CompressionUsage::default()),
            "no data stored yet"
        );
    }
}
