{{- define "emporium-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "emporium-operator.fullname" -}}
{{- default (include "emporium-operator.name" .) .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "emporium-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "emporium-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "emporium-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "emporium-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: emporium
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "emporium-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "emporium-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "emporium-operator.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion | toString -}}
{{- if .Values.image.digest -}}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- /* The namespaces the operator serves: its own first, then .Values.namespaces (a JSON list). */ -}}
{{- define "emporium-operator.namespaces" -}}
{{- $all := list .Release.Namespace -}}
{{- range .Values.namespaces -}}
{{- if not (has . $all) -}}
{{- $all = append $all . -}}
{{- end -}}
{{- end -}}
{{- toJson $all -}}
{{- end -}}
