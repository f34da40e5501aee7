"""The model as channel spaces: trace it (`capture`, `graph`), follow every operation's channels (`ops`,
`shapes`, `functional`, `attention`, `windows`) and group the coupled ones (`spaces`) into a `Plan` (`plan`)."""
