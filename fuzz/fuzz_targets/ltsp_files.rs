//! An LTSP site's dhcpd.conf and lts.conf, as `config import-ltsp` reads them: any bytes give
//! statements or an error naming a line inside the file, never a panic.
#![no_main]

use boot_services::ltsp::{dhcpd_conf, lts_conf};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let lines = text.lines().count().max(1);
    match dhcpd_conf::parse(text) {
        Ok(parsed) => {
            for statement in &parsed.statements {
                assert!(statement.line <= statement.last_line);
                let _ = statement.display();
            }
        }
        Err(error) => assert!(error.line >= 1 && error.line <= lines, "{error}"),
    }
    match lts_conf::parse(text) {
        Ok(sections) => {
            for section in &sections {
                assert!(!section.name.is_empty());
            }
        }
        Err(error) => assert!(error.line >= 1 && error.line <= lines, "{error}"),
    }
});
