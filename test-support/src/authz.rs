//! Authorization matrices: every RPC that acts for someone, called by every
//! kind of caller, compared as one table with the table the service
//! documents, so a wrong cell shows next to all the right ones.

use tonic::{Code, Status};

/// Who calls, in the order of a matrix's columns.
/// `system` is user-service's service token; `user` is the owner of the
/// rows' "own" targets; rows name whose content they act on.
pub const CALLERS: [&str; 7] = ["no token", "expired", "forged", "system", "user", "moderator", "admin"];

/// A cell: `ok`, or the refusal's code as the table spells it.
#[must_use]
pub fn cell<T>(result: &Result<T, Status>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(status) => match status.code() {
            Code::Unauthenticated => "UNAUTH",
            Code::PermissionDenied => "DENIED",
            Code::NotFound => "NOT_FOUND",
            Code::InvalidArgument => "INVALID",
            Code::Unavailable => "UNAVAILABLE",
            _ => "OTHER",
        },
    }
}

/// One row of a matrix: `call` made once as each caller (`None`: no
/// token), each answer as its cell.
pub async fn row<T, F, Fut>(tokens: &[Option<String>], mut call: F) -> Vec<&'static str>
where
    F: FnMut(Option<String>) -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let mut cells = Vec::with_capacity(tokens.len());
    for token in tokens {
        cells.push(cell(&call(token.clone()).await));
    }
    cells
}

/// Panics, printing both tables, unless `actual` equals `expected` (rows of
/// `(row name, one cell per caller)`).
///
/// # Panics
/// When any cell differs.
pub fn assert_matrix(actual: &[(String, Vec<&'static str>)], expected: &[(&str, [&str; 7])]) {
    let render = |rows: Vec<(String, Vec<String>)>| {
        let mut text = format!("{:<42}", "");
        for caller in CALLERS {
            text.push_str(&format!("{caller:<12}"));
        }
        for (row, cells) in rows {
            text.push_str(&format!("\n{row:<42}"));
            for cell in cells {
                text.push_str(&format!("{cell:<12}"));
            }
        }
        text
    };
    let actual_rows: Vec<(String, Vec<String>)> = actual
        .iter()
        .map(|(row, cells)| (row.clone(), cells.iter().map(|c| (*c).to_owned()).collect()))
        .collect();
    let expected_rows: Vec<(String, Vec<String>)> = expected
        .iter()
        .map(|(row, cells)| ((*row).to_owned(), cells.iter().map(|c| (*c).to_owned()).collect()))
        .collect();
    println!("{}", render(actual_rows.clone()));
    assert!(
        actual_rows == expected_rows,
        "the authorization matrix differs\nexpected:\n{}\nactual:\n{}",
        render(expected_rows),
        render(actual_rows)
    );
}
