//! Token ids and labels of every `ok` golden row equal the reference's (`fixtures/golden`).

use crate::common;

use common::*;
use llava_data::record::{parse_record, read_entries};
use llava_data::template::{tokenize, Template};

#[test]
fn token_ids_and_labels_match_the_reference() {
    let tokenizer = tokenizer();
    let mut checked = 0;
    let mut failures = Vec::new();
    for golden in ["golden.jsonl", "golden_square.jsonl", "golden_pad.jsonl"] {
        for row in golden_rows(golden) {
            assert_eq!(row["status"], "ok", "fixture rows are all ok");
            let file = row["file"].as_str().unwrap();
            let index = row["index"].as_u64().unwrap() as usize;
            let template: Template = row["template"].as_str().unwrap().parse().unwrap();
            let entries = read_entries(&fixtures().join("data").join(file)).unwrap();
            let record = parse_record(&entries[index]).unwrap();
            assert_eq!(record.id, row["json_id"].as_str().unwrap());
            let got = tokenize(template, &record, tokenizer)
                .unwrap_or_else(|e| panic!("{file}[{index}] {template}: rejected: {e}"));
            let (want_ids, want_labels) = (ints(&row["input_ids"]), ints(&row["labels"]));
            if got.input_ids != want_ids || got.labels != want_labels {
                failures.push(format!(
                    "{golden} {file}[{index}] {template}: ids equal {}, labels equal {}",
                    got.input_ids == want_ids,
                    got.labels == want_labels
                ));
            }
            checked += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(checked, 47 + 10 + 5);
}
