//! Where a rank comes from: the environment a launcher (torchrun, Slurm's `srun`) sets up.
//!
//! Parsing goes through a lookup closure so it can be tested without touching the real process
//! environment; [`from_process_env`] is the convenience for the binary.

/// Port rank 0 listens on when the launcher does not name one (torchrun's default too).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Which launcher the rank information came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchSource {
    /// `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`.
    Torchrun,
    /// `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, tasks per node, `SLURM_JOB_NODELIST`.
    Slurm,
    /// No launcher: rank 0 of 1.
    Single,
}

/// This process's place in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    pub source: LaunchSource,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LaunchError {
    #[error("{var} is not set ({why})")]
    Missing { var: &'static str, why: String },
    #[error("{var}={value:?}: {reason}")]
    Invalid {
        var: &'static str,
        value: String,
        reason: String,
    },
}

impl LaunchEnv {
    /// Rank 0 of a job of one process.
    pub fn single() -> Self {
        LaunchEnv {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: 1,
            master_addr: "127.0.0.1".to_string(),
            master_port: DEFAULT_MASTER_PORT,
            source: LaunchSource::Single,
        }
    }
}

/// [`from_env`] over the real process environment (non-UTF-8 values count as unset).
pub fn from_process_env() -> Result<LaunchEnv, LaunchError> {
    from_env(&|k| std::env::var(k).ok())
}

/// Reads the rank layout: torchrun's variables win (`RANK` or `WORLD_SIZE` set), else Slurm's
/// (`SLURM_PROCID` set), else a single process.
pub fn from_env(vars: &dyn Fn(&str) -> Option<String>) -> Result<LaunchEnv, LaunchError> {
    // Empty values are what `export RANK=` leaves behind; treat them as unset.
    let get = |k: &str| vars(k).filter(|v| !v.trim().is_empty());
    if get("RANK").is_some() || get("WORLD_SIZE").is_some() {
        torchrun(&get)
    } else if get("SLURM_PROCID").is_some() {
        slurm(&get)
    } else {
        Ok(LaunchEnv::single())
    }
}

fn required(
    get: &dyn Fn(&str) -> Option<String>,
    var: &'static str,
    launcher: &str,
) -> Result<String, LaunchError> {
    get(var).ok_or_else(|| LaunchError::Missing {
        var,
        why: format!("needed for a {launcher} launch"),
    })
}

fn parse_usize(var: &'static str, value: &str) -> Result<usize, LaunchError> {
    value
        .trim()
        .parse::<usize>()
        .map_err(|e| LaunchError::Invalid {
            var,
            value: value.to_string(),
            reason: format!("not a non-negative integer ({e})"),
        })
}

fn parse_count(var: &'static str, value: &str) -> Result<usize, LaunchError> {
    let n = parse_usize(var, value)?;
    if n == 0 {
        return Err(LaunchError::Invalid {
            var,
            value: value.to_string(),
            reason: "must be at least 1".to_string(),
        });
    }
    Ok(n)
}

fn parse_port(var: &'static str, value: &str) -> Result<u16, LaunchError> {
    match value.trim().parse::<u16>() {
        Ok(0) => Err(LaunchError::Invalid {
            var,
            value: value.to_string(),
            reason: "port 0 is not a port rank 0 can be reached at".to_string(),
        }),
        Ok(p) => Ok(p),
        Err(e) => Err(LaunchError::Invalid {
            var,
            value: value.to_string(),
            reason: format!("not a TCP port 1-65535 ({e})"),
        }),
    }
}

/// `index` must lie below `count` (a rank below the world size).
fn check_below(
    var: &'static str,
    index: usize,
    count_var: &str,
    count: usize,
) -> Result<(), LaunchError> {
    if index >= count {
        return Err(LaunchError::Invalid {
            var,
            value: index.to_string(),
            reason: format!("must be below {count_var}={count}"),
        });
    }
    Ok(())
}

fn torchrun(get: &dyn Fn(&str) -> Option<String>) -> Result<LaunchEnv, LaunchError> {
    const L: &str = "torchrun-style";
    let rank = parse_usize("RANK", &required(get, "RANK", L)?)?;
    let world_size = parse_count("WORLD_SIZE", &required(get, "WORLD_SIZE", L)?)?;
    check_below("RANK", rank, "WORLD_SIZE", world_size)?;
    // No single-node defaults: a wrong local rank would silently pick another rank's GPU.
    let local_rank = parse_usize("LOCAL_RANK", &required(get, "LOCAL_RANK", L)?)?;
    let local_world_size = parse_count("LOCAL_WORLD_SIZE", &required(get, "LOCAL_WORLD_SIZE", L)?)?;
    check_below(
        "LOCAL_RANK",
        local_rank,
        "LOCAL_WORLD_SIZE",
        local_world_size,
    )?;
    check_below_or_equal(
        "LOCAL_WORLD_SIZE",
        local_world_size,
        "WORLD_SIZE",
        world_size,
    )?;
    let master_addr = required(get, "MASTER_ADDR", L)?.trim().to_string();
    let master_port = parse_port("MASTER_PORT", &required(get, "MASTER_PORT", L)?)?;
    Ok(LaunchEnv {
        rank,
        world_size,
        local_rank,
        local_world_size,
        master_addr,
        master_port,
        source: LaunchSource::Torchrun,
    })
}

fn check_below_or_equal(
    var: &'static str,
    n: usize,
    max_var: &str,
    max: usize,
) -> Result<(), LaunchError> {
    if n > max {
        return Err(LaunchError::Invalid {
            var,
            value: n.to_string(),
            reason: format!("must not exceed {max_var}={max}"),
        });
    }
    Ok(())
}

fn slurm(get: &dyn Fn(&str) -> Option<String>) -> Result<LaunchEnv, LaunchError> {
    const L: &str = "Slurm";
    let rank = parse_usize("SLURM_PROCID", &required(get, "SLURM_PROCID", L)?)?;
    let world_size = parse_count("SLURM_NTASKS", &required(get, "SLURM_NTASKS", L)?)?;
    check_below("SLURM_PROCID", rank, "SLURM_NTASKS", world_size)?;
    let local_rank = parse_usize("SLURM_LOCALID", &required(get, "SLURM_LOCALID", L)?)?;
    let local_world_size = slurm_local_world_size(get)?;
    check_below(
        "SLURM_LOCALID",
        local_rank,
        "SLURM_NTASKS_PER_NODE/SLURM_TASKS_PER_NODE",
        local_world_size,
    )?;
    // An explicit MASTER_ADDR (common in sbatch scripts) overrides the first node of the job.
    let master_addr = match get("MASTER_ADDR") {
        Some(a) => a.trim().to_string(),
        None => {
            let (var, list) = match get("SLURM_JOB_NODELIST") {
                Some(l) => ("SLURM_JOB_NODELIST", l),
                None => ("SLURM_NODELIST", required(get, "SLURM_NODELIST", L)?),
            };
            first_host(&list).map_err(|reason| LaunchError::Invalid {
                var,
                value: list.clone(),
                reason,
            })?
        }
    };
    // Without MASTER_PORT, a port of this job's own (two jobs sharing a node must not meet).
    let master_port = match (get("MASTER_PORT"), get("SLURM_JOB_ID")) {
        (Some(p), _) => parse_port("MASTER_PORT", &p)?,
        (None, Some(id)) => slurm_job_port(&id),
        (None, None) => DEFAULT_MASTER_PORT,
    };
    Ok(LaunchEnv {
        rank,
        world_size,
        local_rank,
        local_world_size,
        master_addr,
        master_port,
        source: LaunchSource::Slurm,
    })
}

/// The rendezvous port of Slurm job `id` when the script sets no MASTER_PORT: 15000 + id mod
/// 20000, below the ephemeral range Linux hands out (32768 and up).
pub fn slurm_job_port(id: &str) -> u16 {
    let n: u64 = id.trim().bytes().fold(0, |acc, b| {
        if b.is_ascii_digit() {
            (acc * 10 + u64::from(b - b'0')) % 20000
        } else {
            acc
        }
    });
    15000 + n as u16
}

/// Tasks on this node: `SLURM_NTASKS_PER_NODE` (only set with `--ntasks-per-node`), else
/// `SLURM_TASKS_PER_NODE` (`8(x2),4`: per-node counts, indexed by `SLURM_NODEID` when uneven).
fn slurm_local_world_size(get: &dyn Fn(&str) -> Option<String>) -> Result<usize, LaunchError> {
    if let Some(v) = get("SLURM_NTASKS_PER_NODE") {
        return parse_count("SLURM_NTASKS_PER_NODE", &v);
    }
    let Some(v) = get("SLURM_TASKS_PER_NODE") else {
        return Err(LaunchError::Missing {
            var: "SLURM_TASKS_PER_NODE",
            why: "needed for a Slurm launch (nor is SLURM_NTASKS_PER_NODE set)".to_string(),
        });
    };
    let invalid = |reason: String| LaunchError::Invalid {
        var: "SLURM_TASKS_PER_NODE",
        value: v.clone(),
        reason,
    };
    // (count, repeat) groups, in node order.
    let mut groups = Vec::new();
    for part in v.trim().split(',') {
        let part = part.trim();
        let (count, repeat) = match part.split_once("(x") {
            Some((c, rest)) => {
                let r = rest
                    .strip_suffix(')')
                    .ok_or_else(|| invalid(format!("{part:?}: expected N(xM)")))?;
                let r = r
                    .parse::<usize>()
                    .map_err(|e| invalid(format!("{part:?}: bad repeat ({e})")))?;
                (c, r)
            }
            None => (part, 1),
        };
        let count = count
            .parse::<usize>()
            .map_err(|e| invalid(format!("{part:?}: bad task count ({e})")))?;
        if count == 0 || repeat == 0 {
            return Err(invalid(format!("{part:?}: counts must be at least 1")));
        }
        groups.push((count, repeat));
    }
    let first = groups[0].0;
    if groups.iter().all(|&(c, _)| c == first) {
        return Ok(first);
    }
    let node = match get("SLURM_NODEID") {
        Some(n) => parse_usize("SLURM_NODEID", &n)?,
        None => {
            return Err(invalid(
                "uneven tasks per node and SLURM_NODEID is not set to pick this node's count"
                    .to_string(),
            ))
        }
    };
    let mut seen = 0usize;
    for (count, repeat) in groups {
        seen = seen.saturating_add(repeat);
        if node < seen {
            return Ok(count);
        }
    }
    Err(invalid(format!(
        "SLURM_NODEID={node} is past the {seen} nodes listed"
    )))
}

/// The first host of a Slurm hostlist (`node[001-004,007],other` → `node001`).
pub fn first_host(list: &str) -> Result<String, String> {
    let first = split_top_level(list.trim())?
        .into_iter()
        .next()
        .ok_or_else(|| "empty host list".to_string())?;
    let mut host = String::new();
    for seg in parse_host(first)? {
        match seg {
            Segment::Lit(s) => host.push_str(s),
            Segment::Ranges(r) => host.push_str(&r[0].format(r[0].lo)),
        }
    }
    Ok(host)
}

/// Every host of a Slurm hostlist, in order; refuses lists of more than `limit` hosts.
pub fn expand_hostlist(list: &str, limit: usize) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for item in split_top_level(list.trim())? {
        let mut hosts = vec![String::new()];
        for seg in parse_host(item)? {
            match seg {
                Segment::Lit(s) => hosts.iter_mut().for_each(|h| h.push_str(s)),
                Segment::Ranges(ranges) => {
                    let mut next = Vec::new();
                    for h in &hosts {
                        for r in &ranges {
                            for n in r.lo..=r.hi {
                                if out.len() + next.len() >= limit {
                                    return Err(format!("more than {limit} hosts"));
                                }
                                next.push(format!("{h}{}", r.format(n)));
                            }
                        }
                    }
                    hosts = next;
                }
            }
        }
        out.extend(hosts);
        if out.len() > limit {
            return Err(format!("more than {limit} hosts"));
        }
    }
    Ok(out)
}

/// Splits at commas outside brackets.
fn split_top_level(list: &str) -> Result<Vec<&str>, String> {
    let mut items = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in list.char_indices() {
        match c {
            '[' => {
                if depth > 0 {
                    return Err("nested '[' in host list".to_string());
                }
                depth = 1;
            }
            ']' => {
                if depth == 0 {
                    return Err("']' without '[' in host list".to_string());
                }
                depth = 0;
            }
            ',' if depth == 0 => {
                items.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unclosed '[' in host list".to_string());
    }
    items.push(&list[start..]);
    if items.iter().any(|s| s.trim().is_empty()) {
        return Err("empty host name in host list".to_string());
    }
    Ok(items.into_iter().map(str::trim).collect())
}

enum Segment<'a> {
    Lit(&'a str),
    Ranges(Vec<NumRange>),
}

struct NumRange {
    lo: u64,
    hi: u64,
    /// Zero-padded width (`001-004` → 3).
    width: usize,
}

impl NumRange {
    fn format(&self, n: u64) -> String {
        format!("{n:0width$}", width = self.width)
    }
}

fn parse_host(item: &str) -> Result<Vec<Segment<'_>>, String> {
    let mut segs = Vec::new();
    let mut rest = item;
    while let Some(open) = rest.find('[') {
        if open > 0 {
            segs.push(Segment::Lit(&rest[..open]));
        }
        let close = rest[open..]
            .find(']')
            .map(|c| open + c)
            .ok_or_else(|| format!("{item:?}: unclosed '['"))?;
        let mut ranges = Vec::new();
        for r in rest[open + 1..close].split(',') {
            let r = r.trim();
            let (lo_s, hi_s) = r.split_once('-').unwrap_or((r, r));
            let num = |s: &str| {
                s.trim()
                    .parse::<u64>()
                    .map_err(|e| format!("{item:?}: bad number {s:?} in range ({e})"))
            };
            let (lo, hi) = (num(lo_s)?, num(hi_s)?);
            if lo > hi {
                return Err(format!("{item:?}: range {r:?} runs backwards"));
            }
            ranges.push(NumRange {
                lo,
                hi,
                width: lo_s.trim().len(),
            });
        }
        segs.push(Segment::Ranges(ranges));
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        segs.push(Segment::Lit(rest));
    }
    if segs.is_empty() {
        return Err("empty host name in host list".to_string());
    }
    Ok(segs)
}
