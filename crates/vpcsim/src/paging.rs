//! Paginated describes, as EC2 answers them: `MaxResults` bounds a page (5–100 for DescribeRouteTables, 5–1,000
//! for the others underlay uses), `NextToken` continues after the last item of the previous page, and the last
//! page carries no token. Every page is one call: counted, delayed by the call's latency and throttled like any
//! other. A describe by ids is never paged (EC2 refuses `MaxResults` together with instance or ENI ids).
//!
//! The [`underlay_cloud::Cloud`] port reads whole answers: vpcsim's implementation of it follows the pages to
//! the end with [`crate::Config::page_size`] items a page, as the aws-sdk adapter does with the SDK's paginators.

use tokio::time::Instant;
use underlay_cloud::{
    EniFilter, Instance, InstanceFilter, NetworkInterface, Operation, Result, RouteTable, Subnet,
    VpcId,
};

use crate::sim::{VpcSim, World};
use crate::state::err;

/// One page of a describe.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// `None` on the last page.
    pub next_token: Option<String>,
}

/// The largest `MaxResults` EC2 accepts for `op` (the smallest is 5).
pub fn max_page(op: Operation) -> u32 {
    match op {
        Operation::DescribeRouteTables => 100,
        _ => 1_000,
    }
}

const TOKEN_PREFIX: &str = "vpcsim-next:";

fn page_of<T>(
    op: Operation,
    mut items: Vec<T>,
    key: impl Fn(&T) -> String,
    max_results: Option<u32>,
    next_token: Option<&str>,
) -> Result<Page<T>> {
    let Some(max) = max_results else {
        if next_token.is_some() {
            return Err(err(
                "InvalidParameterValue",
                "NextToken given without MaxResults",
            ));
        }
        return Ok(Page {
            items,
            next_token: None,
        });
    };
    if !(5..=max_page(op)).contains(&max) {
        return Err(err(
            "InvalidParameterValue",
            format!(
                "Value ({max}) for parameter maxResults is invalid. Expecting a value between 5 and {}.",
                max_page(op)
            ),
        ));
    }
    items.sort_by_key(|i| key(i));
    let after = match next_token {
        None => None,
        Some(t) => Some(t.strip_prefix(TOKEN_PREFIX).ok_or_else(|| {
            err(
                "InvalidParameterValue",
                format!("The token '{t}' is invalid."),
            )
        })?),
    };
    let mut rest: Vec<T> = items
        .into_iter()
        .filter(|i| after.is_none_or(|a| key(i).as_str() > a))
        .collect();
    let more = rest.len() > max as usize;
    rest.truncate(max as usize);
    let next_token = more
        .then(|| rest.last().map(|i| format!("{TOKEN_PREFIX}{}", key(i))))
        .flatten();
    Ok(Page {
        items: rest,
        next_token,
    })
}

impl VpcSim {
    async fn page<T: Send + 'static>(
        &self,
        op: Operation,
        unfiltered: bool,
        list: impl FnOnce(&mut World, Instant) -> Result<Vec<T>> + Send,
        key: impl Fn(&T) -> String + Send,
        max_results: Option<u32>,
        next_token: Option<&str>,
    ) -> Result<Page<T>> {
        // A paginated describe draws on the filtered-or-paginated bucket.
        let unfiltered = unfiltered && max_results.is_none();
        self.call(op, unfiltered, |w, now| {
            page_of(op, list(w, now)?, key, max_results, next_token)
        })
        .await
    }

    /// DescribeRouteTables (filter `vpc-id`), one page.
    pub async fn describe_route_tables_page(
        &self,
        vpc: &VpcId,
        max_results: Option<u32>,
        next_token: Option<&str>,
    ) -> Result<Page<RouteTable>> {
        self.page(
            Operation::DescribeRouteTables,
            false,
            |w, now| Ok(w.read(now, |s| s.describe_route_tables(vpc))),
            |t| t.id.to_string(),
            max_results,
            next_token,
        )
        .await
    }

    /// DescribeSubnets (filter `vpc-id`), one page.
    pub async fn describe_subnets_page(
        &self,
        vpc: &VpcId,
        max_results: Option<u32>,
        next_token: Option<&str>,
    ) -> Result<Page<Subnet>> {
        self.page(
            Operation::DescribeSubnets,
            false,
            |w, now| Ok(w.read(now, |s| s.describe_subnets(vpc))),
            |t| t.id.to_string(),
            max_results,
            next_token,
        )
        .await
    }

    /// DescribeInstances, one page (`MaxResults` with instance ids is refused, as by EC2).
    pub async fn describe_instances_page(
        &self,
        filter: &InstanceFilter,
        max_results: Option<u32>,
        next_token: Option<&str>,
    ) -> Result<Page<Instance>> {
        if !filter.ids.is_empty() && max_results.is_some() {
            return Err(err(
                "InvalidParameterCombination",
                "The parameter instancesSet cannot be used with the parameter maxResults",
            ));
        }
        let unfiltered = filter.ids.is_empty() && filter.vpc.is_none();
        self.page(
            Operation::DescribeInstances,
            unfiltered,
            |w, now| w.read(now, |s| s.describe_instances(filter)),
            |i| i.id.to_string(),
            max_results,
            next_token,
        )
        .await
    }

    /// DescribeNetworkInterfaces, one page (`MaxResults` with ENI ids is refused, as by EC2).
    pub async fn describe_network_interfaces_page(
        &self,
        filter: &EniFilter,
        max_results: Option<u32>,
        next_token: Option<&str>,
    ) -> Result<Page<NetworkInterface>> {
        if !filter.ids.is_empty() && max_results.is_some() {
            return Err(err(
                "InvalidParameterCombination",
                "The parameter NetworkInterfaceIds cannot be used with the parameter maxResults",
            ));
        }
        self.page(
            Operation::DescribeNetworkInterfaces,
            filter.is_unfiltered(),
            |w, now| w.read(now, |s| s.describe_enis(filter)),
            |e| e.id.to_string(),
            max_results,
            next_token,
        )
        .await
    }

    /// The page size the port's reads use for `op`.
    pub(crate) fn page_size_for(&self, op: Operation) -> u32 {
        self.config().page_size.clamp(5, max_page(op))
    }
}

/// Read every page of a describe: `fetch(token)` returns one page; stop at the page without a token.
pub(crate) async fn all_pages<T, F, Fut>(mut fetch: F) -> Result<Vec<T>>
where
    F: FnMut(Option<String>) -> Fut,
    Fut: std::future::Future<Output = Result<Page<T>>>,
{
    let mut items = Vec::new();
    let mut token = None;
    loop {
        let page = fetch(token.take()).await?;
        items.extend(page.items);
        match page.next_token {
            Some(t) => token = Some(t),
            None => return Ok(items),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_continue_after_the_last_item_and_end_without_a_token() {
        let items: Vec<u32> = (0..12).collect();
        let key = |i: &u32| format!("{i:03}");
        let op = Operation::DescribeRouteTables;
        let p1 = page_of(op, items.clone(), key, Some(5), None).unwrap();
        assert_eq!(p1.items, [0, 1, 2, 3, 4]);
        let p2 = page_of(op, items.clone(), key, Some(5), p1.next_token.as_deref()).unwrap();
        assert_eq!(p2.items, [5, 6, 7, 8, 9]);
        let p3 = page_of(op, items.clone(), key, Some(5), p2.next_token.as_deref()).unwrap();
        assert_eq!(p3.items, [10, 11]);
        assert_eq!(p3.next_token, None);
        // Exactly a page: no token after it.
        let p = page_of(op, (0..5).collect(), key, Some(5), None).unwrap();
        assert_eq!(p.next_token, None);
        // No MaxResults: everything at once.
        let all = page_of(op, items.clone(), key, None, None).unwrap();
        assert_eq!(all.items.len(), 12);
    }

    #[test]
    fn page_sizes_and_tokens_are_validated() {
        let key = |i: &u32| i.to_string();
        let bad = |op, max, token: Option<&str>| {
            page_of(op, vec![1u32], key, max, token).unwrap_err().code
        };
        assert_eq!(
            bad(Operation::DescribeRouteTables, Some(4), None),
            "InvalidParameterValue"
        );
        assert_eq!(
            bad(Operation::DescribeRouteTables, Some(101), None),
            "InvalidParameterValue"
        );
        assert!(
            page_of(
                Operation::DescribeSubnets,
                vec![1u32],
                key,
                Some(1000),
                None
            )
            .is_ok()
        );
        assert_eq!(
            bad(Operation::DescribeSubnets, Some(5), Some("junk")),
            "InvalidParameterValue"
        );
        assert_eq!(
            bad(Operation::DescribeSubnets, None, Some("vpcsim-next:1")),
            "InvalidParameterValue"
        );
    }
}
