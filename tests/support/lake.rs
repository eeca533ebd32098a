//! Reads a file:// lake back with the `parquet` crate and replays each table's changelog.

use arrow::array::{Array, RecordBatch, StringArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One changelog row: metadata and every table column rendered as text (`None` for NULL).
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeRow {
    pub op: String,
    pub position: String,
    pub file: PathBuf,
    pub columns: BTreeMap<String, Option<String>>,
}

/// Every Parquet file of a table's dataset, in name order.
pub fn files(lake: &Path, table: &str) -> Vec<PathBuf> {
    parquet_files(&lake.join(table))
}

/// Every Parquet file below `dir`, in name order.
pub fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

pub fn batches(file: &Path) -> Vec<RecordBatch> {
    let f = std::fs::File::open(file).unwrap();
    ParquetRecordBatchReaderBuilder::try_new(f).unwrap().build().unwrap().map(|b| b.unwrap()).collect()
}

/// All changelog rows of a table, in position order.
pub fn changelog(lake: &Path, table: &str) -> Vec<ChangeRow> {
    let mut rows = Vec::new();
    for file in files(lake, table) {
        for batch in batches(&file) {
            let schema = batch.schema();
            let op =
                batch.column_by_name("_sluice_op").unwrap().as_any().downcast_ref::<StringArray>().unwrap().clone();
            let pos = batch
                .column_by_name("_sluice_position")
                .unwrap()
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap()
                .clone();
            let opts = FormatOptions::default();
            // Display of a named zone needs a tz database; the instant is what is compared.
            let zoneless: Vec<arrow::array::ArrayRef> = batch
                .columns()
                .iter()
                .map(|c| match c.data_type() {
                    DataType::Timestamp(unit, Some(_)) => cast(c, &DataType::Timestamp(*unit, None)).unwrap(),
                    _ => c.clone(),
                })
                .collect();
            let formatters: Vec<(String, ArrayFormatter)> = schema
                .fields()
                .iter()
                .enumerate()
                .filter(|(_, f)| !f.name().starts_with("_sluice_"))
                .map(|(i, f)| (f.name().clone(), ArrayFormatter::try_new(zoneless[i].as_ref(), &opts).unwrap()))
                .collect();
            for r in 0..batch.num_rows() {
                let mut columns = BTreeMap::new();
                for (i, (name, fmt)) in formatters.iter().enumerate() {
                    let col = batch.column(schema.index_of(name).unwrap());
                    let _ = i;
                    columns.insert(name.clone(), (!col.is_null(r)).then(|| fmt.value(r).to_string()));
                }
                rows.push(ChangeRow {
                    op: op.value(r).to_string(),
                    position: pos.value(r).to_string(),
                    file: file.clone(),
                    columns,
                });
            }
        }
    }
    rows.sort_by(|a, b| a.position.cmp(&b.position));
    rows
}

/// Applies a changelog in position order: the table as the changelog says it ends.
pub fn replay(rows: &[ChangeRow], key: &str) -> BTreeMap<String, BTreeMap<String, Option<String>>> {
    let mut state = BTreeMap::new();
    for r in rows {
        match r.op.as_str() {
            "truncate" => state.clear(),
            "delete" => {
                state.remove(r.columns[key].as_ref().unwrap());
            }
            _ => {
                state.insert(r.columns[key].clone().unwrap(), r.columns.clone());
            }
        }
    }
    state
}

/// Positions that occur more than once (a duplicate delivery).
pub fn duplicate_positions(rows: &[ChangeRow]) -> Vec<String> {
    let mut seen = std::collections::HashMap::new();
    for r in rows {
        *seen.entry(r.position.clone()).or_insert(0) += 1;
    }
    let mut d: Vec<String> = seen.into_iter().filter(|(_, n)| *n > 1).map(|(p, _)| p).collect();
    d.sort();
    d
}
